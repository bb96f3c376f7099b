from spmd_lopt.launch import run

run()

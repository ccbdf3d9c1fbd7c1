from dipuq.cli import run

run()

from hpcdiff.cli import run

run()

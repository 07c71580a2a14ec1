"""`python -m minillama.bench --worker SPEC`: one benchmark side, in its own process."""

import argparse

from minillama.bench.workers import worker_main

parser = argparse.ArgumentParser(description="internal: one benchmark side (used by `minillama bench`)")
parser.add_argument("--worker", required=True, help="the side's settings as JSON")
worker_main(parser.parse_args().worker)

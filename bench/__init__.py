"""raylab's benchmarks: figures a skeptic would accept, printed and written, never asserted.

    python -m bench                      # every measurement (long on a 2-core machine)
    python -m bench --smoke              # tiny sizes, one round: checks that everything runs
    python -m bench --only throughput,startup --out /tmp/bench

See `bench/__main__.py` for the list of measurements; each lives in its own
module, and `bench.harness` holds what they share (A/B interleaving, median and
spread, machine state, tables, JSON and plots). This package imports nothing
heavy: Ray workers preload `bench.stamps` through it.
"""

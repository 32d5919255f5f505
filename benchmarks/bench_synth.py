"""Benchmark `shirg-hf synth`: images per second on one core, per family and geometry.

Times, in this process (run it with one thread; the generator itself uses none), drawing the image and question
only, drawing plus the PNG encoding the data set stores, and `write_synth` end to end (PNG, Arrow file,
`save_to_disk`) for the default families. Goal: >= 200 images/s at the default (evidence, 128 / 72 px) sizes.

    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py              # about a minute
    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py --n 4000 --geometries evidence,lavida
"""

import argparse
import os
import platform
import tempfile
import time

from shirg_hf import synth


def images_per_second(geometry, families, n: int, encode: bool) -> float:
    """Rows per second of `generate_sample` (+ PNG encoding) over n rows of the train split."""
    start = time.perf_counter()
    for index in range(n):
        sample = synth.generate_sample("train", 0, index, geometry, families)
        if encode:
            synth.png_bytes(sample.image)
    return n / (time.perf_counter() - start)


def end_to_end(geometry, n: int) -> float:
    """Rows per second of `write_synth` (every family) into a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        synth.write_synth(os.path.join(folder, "set"), "train", n, 0, geometry)
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="rows per measurement (default 2000)")
    parser.add_argument("--geometries", default="evidence", help=f"comma-separated among {synth.CONFIG_PRESETS}")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, n = {args.n}\n")
    print("| geometry (high / native px) | families | draw only (images/s) | draw + PNG | write_synth end to end |")
    print("|---|---|---|---|---|")
    for name in args.geometries.split(","):
        geometry = synth.preset_geometry(name)
        sides = f"{name} ({geometry.high_res_side} / {geometry.native_side})"
        for family in synth.FAMILIES:
            draw = images_per_second(geometry, (family,), args.n, encode=False)
            encoded = images_per_second(geometry, (family,), args.n, encode=True)
            print(f"| {sides} | {family} | {draw:.0f} | {encoded:.0f} | |", flush=True)
        draw = images_per_second(geometry, synth.FAMILIES, args.n, encode=False)
        encoded = images_per_second(geometry, synth.FAMILIES, args.n, encode=True)
        print(f"| {sides} | all | {draw:.0f} | {encoded:.0f} | {end_to_end(geometry, args.n):.0f} |", flush=True)


if __name__ == "__main__":
    main()

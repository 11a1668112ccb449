"""Does a background compile disturb the plain graphs' captures? Fresh processes, each a pipeline with
``compile="head", compile_in_background=True`` (the shipped weights, bf16, batch 64): the first batch at 224 px, then
(``--keys 2``) at once a first batch at 384 px, met while the helper thread compiles the 224 px chain (the pipeline
serves it eagerly until that compile ends, then captures it); then more batches of both, the wait for the compiles,
and one batch more. Prints, per process, the times, every warning, the keys whose capture failed (with the error),
the failed compiles, and how many calls the compiled graphs served.

    python bench/compile_race_probe.py --runs 3 --keys 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings


def child(keys: int) -> dict:
    caught: list[str] = []
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, category, *_: caught.append(f"{category.__name__}: {message}")
    import torch

    from arrcoc import Pipeline

    pipe = Pipeline.from_pretrained(
        device="cuda", encoder_dtype="bfloat16", compile="head", compile_in_background=True, buckets=(224, 384)
    )
    sizes = (224, 384)[:keys]
    pixels = {s: torch.randint(0, 256, (64, 3, s, s), dtype=torch.uint8, device="cuda") for s in sizes}
    times = {}
    start = time.perf_counter()
    for s in sizes:
        pipe(pixels[s], budget=32, copy=False).tokens.sum().item()
        times[f"first {s}"] = round(time.perf_counter() - start, 2)
    for _ in range(20):
        for s in sizes:
            pipe(pixels[s], budget=32, copy=False)
    torch.cuda.synchronize()
    times["more batches"] = round(time.perf_counter() - start, 2)
    done = pipe.wait_for_compile(240)
    times["compiled"] = round(time.perf_counter() - start, 2)
    for s in sizes:
        pipe(pixels[s], budget=32, copy=False).tokens.sum().item()
    return {
        "keys": keys,
        "times": times,
        "compiles_done": done,
        "eager_only": {str(k): v for k, v in pipe._eager_only.items()},
        "compile_failures": {str(k): v for k, v in pipe.compiled_chains.failures.items()},
        "compiled_hits": pipe.compiled_chains.cache.stats()["hits"],
        "warnings": caught,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print("probe-result " + json.dumps(child(args.child)))
        return
    for keys in args.keys:
        for run in range(1, args.runs + 1):
            began = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(keys)], capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("probe-result ")]
            result = json.loads(lines[-1][len("probe-result ") :]) if lines else {"error": proc.stderr[-3000:]}
            result.update(run=run, exit=proc.returncode, wall_s=round(time.perf_counter() - began, 1))
            print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tune vLLM's fused-MoE Triton kernel for this model's shapes on the GPU at hand.

Usage:
  bench/tune_moe.py --dtype fp8_w8a8                     # E=128, N=768 (TP=1), into moe_configs/
  bench/tune_moe.py --dtype bf16 --intermediate 384      # TP=2 shards the experts: N=384
  bench/tune_moe.py --dtype bf16 --batch-sizes 1,64,4096 --grid small --max-seconds 120
  bench/tune_moe.py --dtype bf16 --check                 # time vLLM's current choice only

vLLM runs the experts of a Qwen3 MoE layer with one Triton kernel (fused_experts) whose tile
sizes it looks up per batch size M in a JSON file named after the shape, the card and the dtype,
e.g. `E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json`; with no file it logs
"Using default MoE config. Performance might be sub-optimal!" and uses a generic rule. This tool
times fused_experts itself (random weights and routing of the real shapes, each timing a CUDA
graph of 10 calls, replayed) for every batch size vLLM looks up, over a grid of Triton configs
pruned around vLLM's default for that M, plus vLLM's default and every config vLLM ships for
the same shape on other cards. It writes the fastest per M under vLLM's own file name (vLLM's
get_config_file_name) into --out-dir, which start_service.sh hands vLLM as
VLLM_TUNED_CONFIG_FOLDER (setting MOE_CONFIG_DIR), and a report (--report) of every M's default
and tuned time.

Triton compiles each config once, on its first launch; --jobs worker processes compile the grid
in parallel first (into Triton's cache), then one process times everything.
Exit codes: 0 written, 1 failed (no GPU, vLLM missing), 2 usage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = ROOT / "moe_configs"

# The batch sizes vLLM's tuned files list (it picks the nearest one for any other M).
VLLM_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
CALLS_PER_GRAPH = 10

Config = dict[str, int]


# The grid per batch-size class: (largest M of the class, the values of each CONFIG_KEYS axis).
# Few tokens per expert want small M tiles and deep pipelines (memory bound); many want big tiles
# and more warps (compute bound).
GRIDS: tuple[tuple[int, tuple[Sequence[int], ...]], ...] = (
    # (M ≤, (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages))
    (16, ([16], [32, 64, 128, 256], [64, 128, 256], [1], [4, 8], [3, 4, 5])),
    (128, ([16, 32], [64, 128, 256], [64, 128], [1], [4, 8], [2, 3, 4])),
    (512, ([32, 64], [64, 128, 256], [64, 128], [1], [4, 8], [3, 4])),
    (1 << 30, ([64, 128], [128, 256], [64, 128], [1, 16], [4, 8], [3, 4])),
)


def grid_for(m: int, size: str) -> list[Config]:
    """Candidate configs for batch size m (GRIDS)."""
    axes = dict(zip(CONFIG_KEYS, next(a for top, a in GRIDS if m <= top), strict=True))
    if size == "small":  # a quick pass: the middle two of a longer axis, the first of a shorter one
        axes = {k: (v[len(v) // 2 - 1 : len(v) // 2 + 1] if len(v) > 2 else v[:1]) for k, v in axes.items()}
    return [
        dict(zip(CONFIG_KEYS, values, strict=True))
        for values in itertools.product(*(axes[k] for k in CONFIG_KEYS))
    ]


def normalized(config: dict[str, Any]) -> Config:
    return {k: int(config[k]) for k in CONFIG_KEYS if k in config}


def key_of(config: Config) -> tuple[int, ...]:
    return tuple(config.get(k, 0) for k in CONFIG_KEYS)


def shipped_configs(experts: int, intermediate: int, dtype: str | None) -> dict[str, dict[int, Config]]:
    """The configs vLLM ships for this shape and dtype on any card: good seeds for ours."""
    from vllm.model_executor.layers import fused_moe

    folder = Path(fused_moe.__file__).parent / "configs"
    suffix = f",dtype={dtype}.json" if dtype else ".json"
    found: dict[str, dict[int, Config]] = {}
    for path in sorted(folder.glob(f"E={experts},N={intermediate},device_name=*")):
        if not path.name.endswith(suffix) or (not dtype and ",dtype=" in path.name):
            continue
        table = json.loads(path.read_text())
        table.pop("triton_version", None)
        found[path.name] = {int(m): normalized(c) for m, c in table.items()}
    return found


def nearest(table: dict[int, Config], m: int) -> Config:
    return table[min(table, key=lambda k: abs(k - m))]


def candidates(m: int, size: str, default: Config, seeds: Iterable[dict[int, Config]]) -> list[Config]:
    """vLLM's default first (every M always has a valid timing), then the shipped seeds, then the grid."""
    out: dict[tuple[int, ...], Config] = {}
    for config in [normalized(default), *(nearest(t, m) for t in seeds), *grid_for(m, size)]:
        out.setdefault(key_of(config), config)
    return list(out.values())


def write_table(path: Path, best: dict[int, Config], triton_version: str) -> None:
    """vLLM's format: {"triton_version": ..., "<M>": {config}, ...}, M ascending; atomic."""
    body: dict[str, Any] = {"triton_version": triton_version}
    body.update({str(m): best[m] for m in sorted(best)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=4) + "\n")
    os.replace(tmp, path)


# --- on the GPU ----------------------------------------------------------------------------------


class Bench:
    """Inputs of one shape, and fused_experts timed under a given config."""

    def __init__(self, experts: int, intermediate: int, hidden: int, topk: int, dtype: str, max_m: int):
        import torch
        from vllm.model_executor.layers.fused_moe import fused_moe as fm
        from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
        from vllm.platforms import current_platform

        self.torch, self.fm = torch, fm
        self.experts, self.intermediate, self.hidden, self.topk = experts, intermediate, hidden, topk
        self.config_dtype = "fp8_w8a8" if dtype == "fp8_w8a8" else None
        dev = "cuda"
        torch.manual_seed(0)
        w1 = torch.randn(experts, 2 * intermediate, hidden, device=dev, dtype=torch.bfloat16) / 16
        w2 = torch.randn(experts, hidden, intermediate, device=dev, dtype=torch.bfloat16) / 16
        self.quant_config = None
        if self.config_dtype == "fp8_w8a8":
            # What --quantization fp8 serves here: per-tensor weight and static activation scales.
            fp8 = current_platform.fp8_dtype()
            w1, w2 = w1.to(fp8), w2.to(fp8)
            ones = torch.ones(experts, device=dev, dtype=torch.float32)
            self.quant_config = fp8_w8a8_moe_quant_config(
                w1_scale=ones,
                w2_scale=ones.clone(),
                a1_scale=torch.ones(1, device=dev, dtype=torch.float32),
                a2_scale=torch.ones(1, device=dev, dtype=torch.float32),
            )
        self.w1, self.w2 = w1, w2
        self.x_all = torch.randn(max_m, hidden, device=dev, dtype=torch.bfloat16)
        # Routing as sampled captions on random weights see it: top-k of random logits per token.
        logits = torch.randn(max_m, experts, device=dev, dtype=torch.float32)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), topk, dim=-1)
        self.weights_all, self.ids_all = weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)

    def default_config(self, m: int) -> Config:
        return normalized(
            self.fm.get_default_config(
                m, self.experts, self.intermediate, self.hidden, self.topk, self.config_dtype
            )
        )

    def vllm_choice(self, m: int) -> Config:
        """What vLLM would run today (its file for this card if it has one, else its default)."""
        table = self.fm.get_moe_configs(self.experts, self.intermediate, self.config_dtype)
        return normalized(nearest(table, m)) if table else self.default_config(m)

    def _call(self, m: int) -> None:
        self.fm.fused_experts(
            self.x_all[:m],
            self.w1,
            self.w2,
            self.weights_all[:m],
            self.ids_all[:m],
            quant_config=self.quant_config,
        )

    def compile_only(self, config: Config, m: int) -> bool:
        from vllm.model_executor.layers.fused_moe import override_config

        try:
            with override_config({**config, "SPLIT_K": 1}):
                self._call(m)
            self.torch.cuda.synchronize()
            return True
        except Exception:  # OutOfResources and friends: the config does not fit this card
            return False

    def time_us(self, config: Config, m: int, replays: int) -> float | None:
        """Mean microseconds of one fused_experts call at batch size m under config; None when
        the config cannot run here."""
        torch = self.torch
        from vllm.model_executor.layers.fused_moe import override_config

        try:
            with override_config({**config, "SPLIT_K": 1}):
                self._call(m)  # compile (or load from Triton's cache) before capturing
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(CALLS_PER_GRAPH):
                        self._call(m)
            torch.cuda.synchronize()
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1000 / (replays * CALLS_PER_GRAPH)
        except Exception:
            torch.cuda.synchronize()
            return None
        finally:
            if "graph" in locals():
                del graph


def vllm_context() -> Any:
    """vLLM's kernels read the current vLLM config; outside an engine, a default one."""
    from vllm.config import VllmConfig, set_current_vllm_config

    return set_current_vllm_config(VllmConfig())


def _compile_worker(args: tuple[dict[str, Any], list[tuple[Config, int]]]) -> int:
    shape, work = args
    with vllm_context():
        bench = Bench(**shape)
        return sum(bench.compile_only(config, m) for config, m in work)


def share_deadline(now: float, ends: float, batch_sizes_left: int) -> float:
    """When the batch size about to be timed must stop: an even share of what is left."""
    return now + max(0.0, ends - now) / max(1, batch_sizes_left)


def replays_for(m: int) -> int:
    return 20 if m <= 256 else 10 if m <= 1024 else 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("--experts", type=int, default=128, help="E: experts per layer (default 128)")
    p.add_argument(
        "--intermediate",
        type=int,
        default=768,
        help="N: expert intermediate size per GPU, moe_intermediate / TP (default 768: TP=1)",
    )
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    p.add_argument("--topk", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--dtype", choices=["bf16", "fp8_w8a8"], required=True)
    p.add_argument(
        "--batch-sizes",
        default=",".join(map(str, VLLM_BATCH_SIZES)),
        help="batch sizes M to tune, comma-separated (default: the ones vLLM looks up)",
    )
    p.add_argument("--grid", choices=["full", "small"], default="full", help="candidate grid per M")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="processes compiling the grid first (0: compile while timing)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="the whole run's bound, compiling included (0: no limit): what is left after "
        "compiling is shared evenly by the batch sizes, each keeping its best so far, vLLM's "
        "default at worst; time one leaves unused goes to the next",
    )
    p.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the JSON goes (default moe_configs/)"
    )
    p.add_argument(
        "--report", type=Path, help="also write every M's default, vLLM's and tuned timings here (JSON)"
    )
    p.add_argument(
        "--check", action="store_true", help="time vLLM's current choice and its default only; write nothing"
    )
    args = p.parse_args(argv)
    try:
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        p.error(
            f"--batch-sizes {args.batch_sizes!r}: expected whole numbers separated by commas, e.g. 1,64,4096"
        )
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes: every batch size must be 1 or more")
    return args


def say(msg: str) -> None:
    print(f"tune_moe: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        context = vllm_context()
    except ImportError as exc:
        say(f"needs vLLM with CUDA ({exc}): run it where ./install.sh installed the GPU lock")
        return 1
    with context:
        return tune(args)


def tune(args: argparse.Namespace) -> int:
    try:
        import torch
        import triton
        from vllm.model_executor.layers.fused_moe import fused_moe as fm
    except ImportError as exc:
        say(f"needs vLLM with CUDA ({exc}): run it where ./install.sh installed the GPU lock")
        return 1
    if not torch.cuda.is_available():
        say("no CUDA GPU here: run it on the GPU host")
        return 1
    shape = dict(
        experts=args.experts,
        intermediate=args.intermediate,
        hidden=args.hidden,
        topk=args.topk,
        dtype=args.dtype,
        max_m=max(args.batch_sizes),
    )
    started = time.monotonic()
    bench = Bench(**shape)
    seeds = list(shipped_configs(args.experts, args.intermediate, bench.config_dtype).values())
    file_name = fm.get_config_file_name(args.experts, args.intermediate, bench.config_dtype)
    say(
        f"{file_name}: {len(args.batch_sizes)} batch sizes, {len(seeds)} shipped tables as seeds, "
        f"card {torch.cuda.get_device_name()}"
    )

    plan = {
        m: (
            [bench.vllm_choice(m), bench.default_config(m)]
            if args.check
            else candidates(m, args.grid, bench.default_config(m), seeds)
        )
        for m in args.batch_sizes
    }
    if args.jobs > 0 and not args.check:
        work = [(c, m) for m, cs in plan.items() for c in cs]
        chunks = [work[i :: args.jobs] for i in range(args.jobs)]
        say(f"compiling {len(work)} (config, M) pairs in {args.jobs} processes")
        try:
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                ok = sum(pool.map(_compile_worker, [(shape, chunk) for chunk in chunks]))
            say(
                f"compiled: {ok} ran, {len(work) - ok} do not fit this card "
                f"({time.monotonic() - started:.0f} s)"
            )
        except Exception as exc:  # the timing pass compiles what is missing
            say(f"parallel compile failed ({type(exc).__name__}: {exc}); compiling while timing")

    report: dict[str, Any] = {
        "file": file_name,
        "card": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "experts": args.experts,
        "intermediate": args.intermediate,
        "hidden": args.hidden,
        "topk": args.topk,
        "grid": args.grid,
        "triton_version": triton.__version__,
        "batch_sizes": {},
    }
    best: dict[int, Config] = {}
    out_of_time = False
    ends = started + args.max_seconds
    for j, (m, configs) in enumerate(plan.items()):
        timed: list[tuple[float, Config]] = []
        deadline = share_deadline(time.monotonic(), ends, len(plan) - j)
        for i, config in enumerate(configs):
            if i and args.max_seconds and time.monotonic() > deadline:
                out_of_time = True
                break
            us = bench.time_us(config, m, replays_for(m))
            if us is not None:
                timed.append((us, config))
        if not timed:
            say(f"M={m}: no config ran")
            return 1
        default_us = next((us for us, c in timed if c == configs[0]), None)
        best_us, best[m] = min(timed, key=lambda t: t[0])
        report["batch_sizes"][str(m)] = {
            "default_us": default_us,
            "tuned_us": best_us,
            "tuned": best[m],
            "candidates": len(configs),
            "timed": len(timed),
        }
        say(
            f"M={m:5d}: {'vLLM now' if args.check else 'default'} {default_us or float('nan'):9.1f} us, "
            f"best {best_us:9.1f} us ({len(timed)}/{len(configs)} timed)"
        )
    if out_of_time:
        say(f"--max-seconds {args.max_seconds:g}: batch sizes not timed in full kept their best so far")
    report["seconds"] = round(time.monotonic() - started, 1)
    if not args.check:
        write_table(args.out_dir / file_name, best, triton.__version__)
        say(f"wrote {args.out_dir / file_name} ({report['seconds']} s)")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

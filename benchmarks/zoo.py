"""Benchmark the tracer over model zoos: torchvision's classifiers (and timm's, when installed).

    python benchmarks/zoo.py                                 # every torchvision classifier
    python benchmarks/zoo.py --models resnet50 vit_b_32 --recover vit_b_32
    python benchmarks/zoo.py --timm                          # plus a chosen subset of timm
    python benchmarks/zoo.py --no-torchvision --timm 'convnext_*' --out /tmp/zoo/timm.csv

Per model, one at a time (built, measured, freed): build it untrained (random init, eval mode)
with ``num_classes=10`` and the smallest input of 64, 128, 224, 299 pixels it accepts (ViTs get
``image_size``/``img_size`` 64 where their builder takes it); :func:`trace_spec` on a batch-1
input; :func:`check_equivalence` (a seeded random permutation through the spec, on the model and
on a perturbed copy of its weights) on a batch of 2, after BatchNorm statistics from one
training-mode pass on 8 random images; the share of the parameters that lie on a
permuted axis; the groups; what stayed unpermuted and why (the tracer's one summary warning);
wall times. ``--recover NAME ...``: plant a random permutation (B = π(A) + 1e-3 noise) and count
the groups that weight matching gets wrong. Models above ``--max-params`` are skipped with a
note. Prints a table and a summary; ``--out`` also writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import csv
import gc
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from lmcflow.alignment import (EquivalenceError, SpecWarning, TraceError,  # noqa: E402
                               apply_permutation, check_equivalence, invert_permutation,
                               random_permutation, trace_spec, weight_matching)
from lmcflow.alignment.trace.summary import permuted_share  # noqa: E402
from lmcflow.models import external_factory  # noqa: E402

NUM_CLASSES = 10
SIZES = (64, 128, 224, 299)
# timm models of many families (convolutional, mobile, mixed kernels, concatenation, attention,
# hybrids): the default --timm subset
TIMM_DEFAULT = (
    "resnet10t", "resnet18d", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "res2net50_14w_8s",
    "regnetx_002", "regnety_002", "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv3_small_100",
    "mobilenetv4_conv_small", "mixnet_s", "ghostnet_100", "rexnet_100", "lcnet_050", "dla34",
    "densenet121", "dpn68", "cspresnet50", "ese_vovnet19b_dw", "hrnet_w18_small", "convnext_atto",
    "convnextv2_atto", "edgenext_xx_small", "poolformer_s12", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "vit_small_patch16_224", "beit_base_patch16_224",
    "swin_tiny_patch4_window7_224", "levit_128s", "mobilevit_xxs", "coatnet_nano_rw_224",
    "efficientformer_l1", "fastvit_t8", "tiny_vit_5m_224", "pvt_v2_b0", "eva02_tiny_patch14_224",
    "mixer_s16_224", "resmlp_12_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
)
COLUMNS = ("source", "model", "params", "input", "kwargs", "status", "build_s", "trace_s",
           "check_s", "groups", "permuted_share", "max_rel_error", "recovered", "recover_s",
           "unpermuted")


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


def _size_kwargs(source: str, name: str, size: int) -> dict:
    """Builder arguments that set the input size, for models whose size is fixed at build."""
    if source == "torchvision" and name.startswith("vit_"):
        return {"image_size": size}
    if source == "timm":
        return {"img_size": size}
    return {}


def _build(source: str, name: str, extra: dict) -> tuple[nn.Module, int, dict]:
    """(model in eval mode, input size, builder kwargs): the smallest size of SIZES it takes.
    A builder that sets the input size (``image_size``/``img_size``) is called per size; one
    that refuses it (TypeError) is built once."""
    factory = external_factory(f"{source}:{name}")
    sized = bool(_size_kwargs(source, name, SIZES[0]))
    model, kwargs, last = None, dict(extra), None
    for size in SIZES:
        if model is None or sized:
            model = None
            gc.collect()
            kwargs = {**extra, **(_size_kwargs(source, name, size) if sized else {})}
            torch.manual_seed(0)
            try:
                model = factory(num_classes=NUM_CLASSES, **kwargs).eval()
            except TypeError:
                if not sized:
                    raise
                sized, kwargs = False, dict(extra)
                model = factory(num_classes=NUM_CLASSES, **kwargs).eval()
            except (AssertionError, ValueError) as e:  # this size refused (ViT-H/14 at 64)
                last = e
                continue
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, 3, size, size))
            if tuple(out.shape) == (1, NUM_CLASSES):
                return model, size, kwargs
            last = ValueError(f"outputs of shape {tuple(out.shape)}")
        except _Timeout:
            raise
        except Exception as e:  # too small for this model: try the next size
            last = e
    raise RuntimeError(f"no input size of {SIZES} works ({type(last).__name__}: "
                       f"{str(last)[:120]})")


def _extra_kwargs(source: str, name: str) -> dict:
    """Builder arguments a user of the workflow would set: GoogLeNet and Inception v3 return
    auxiliary logits in training unless ``aux_logits=False`` (their aux heads would otherwise
    be parameters the eval graph never uses)."""
    if source == "torchvision" and name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def _param_count(source: str, name: str) -> int | None:
    """Parameters of a model without building its weights, or None: built on the meta device,
    or, for builders that compute with tensors (RegNet's widths), with every parameter moved
    to the meta device as it is registered (initialisers then cost nothing)."""
    factory = external_factory(f"{source}:{name}")
    kwargs = dict(num_classes=NUM_CLASSES, **_extra_kwargs(source, name))
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in factory(**kwargs).parameters())
    except Exception:
        pass
    register = nn.Module.register_parameter

    def to_meta(module, key, param):
        register(module, key, param)
        if param is not None:
            module._parameters[key] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        return sum(p.numel() for p in factory(**kwargs).parameters())
    except Exception:
        return None
    finally:
        nn.Module.register_parameter = register


def _short(reasons: str) -> str:
    """The summary warning without its head (model, groups, share): what stayed unpermuted."""
    return reasons.split("left unpermuted: ", 1)[-1] if reasons else ""


def recover(model: nn.Module, spec, seed: int = 0, first_solve: str = "all"
            ) -> tuple[str, float]:
    """Plant a random permutation (B = π(A) + 1e-3 noise) and count the groups weight matching
    (with ``first_solve``) gets right: "right/total"."""
    gen = torch.Generator().manual_seed(seed)
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = random_permutation(spec, gen)
    state_b = apply_permutation(spec, planted, state_a)
    state_b = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in state_b.items()}
    start = time.perf_counter()
    perm, _ = weight_matching(spec, state_a, state_b, seed=seed, first_solve=first_solve)
    seconds = time.perf_counter() - start
    truth = invert_permutation(planted)
    right = sum(torch.equal(perm[g], truth[g]) for g in spec.sizes)
    return f"{right}/{len(spec.sizes)}", seconds


def run(source: str, name: str, max_params: float, recover_names, timeout: int,
        first_solve: str = "all") -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(source=source, model=name)
    params = _param_count(source, name)
    if params is not None:
        row["params"] = params
    if params is not None and params > max_params:
        row["status"] = f"skipped (> --max-params {max_params:.3g})"
        return row
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    model = spec = None
    try:
        start = time.perf_counter()
        try:
            model, size, kwargs = _build(source, name, _extra_kwargs(source, name))
        except _Timeout:
            raise
        except Exception as e:
            row["status"] = f"build failed: {type(e).__name__}: {str(e)[:100]}"
            return row
        row.update(build_s=round(time.perf_counter() - start, 2), input=f"{size}x{size}",
                   kwargs=" ".join(f"{k}={v}" for k, v in kwargs.items()),
                   params=sum(p.numel() for p in model.parameters()))
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpecWarning)
            try:
                spec = trace_spec(model, torch.zeros(1, 3, size, size))
            except TraceError as e:
                row["status"] = f"trace failed: {str(e)[:120]}"
                return row
        row["trace_s"] = round(time.perf_counter() - start, 2)
        notes = [str(w.message) for w in caught if issubclass(w.category, SpecWarning)]
        permuted, total = permuted_share(spec, model)
        row.update(groups=len(spec.sizes), permuted_share=round(permuted / max(total, 1), 4),
                   unpermuted=_short(notes[-1]) if notes else "")
        start = time.perf_counter()
        try:
            x = torch.randn(2, 3, size, size, generator=gen)
            _calibrate_norms(model, torch.randn(8, 3, size, size, generator=gen))
            result = check_equivalence(model, spec, x)
            row.update(status="ok", max_rel_error=f"{result['max_rel_error']:.1e}")
        except EquivalenceError as e:
            row.update(status=f"not equivalent: {str(e)[:160]}", max_rel_error=f"{e.error:.1e}")
        row["check_s"] = round(time.perf_counter() - start, 2)
        if name in recover_names and row["status"] == "ok":
            row["recovered"], seconds = recover(model, spec, first_solve=first_solve)
            row["recover_s"] = round(seconds, 1)
    except _Timeout:
        row["status"] = f"timeout (> {timeout} s)"
    except Exception as e:  # a benchmark reports, it does not stop
        row["status"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    finally:
        signal.alarm(0)
        del model, spec
        gc.collect()
    return row


@torch.no_grad()
def _calibrate_norms(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics of one training-mode pass on ``x`` (as after training, where
    they match the activations; at their initial 0/1 a net such as GoogLeNet, with its
    0.01-std weights, gives the same output for every input, and no check can see a
    permutation)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, the batch's statistics
    model.train()
    model(x)
    model.eval()
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def _models(args) -> list[tuple[str, str]]:
    out = []
    if args.torchvision:
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)
        out += [("torchvision", n) for n in names if not args.models or n in args.models]
    if args.timm is not None:
        try:
            import timm
        except ImportError:
            sys.exit("--timm needs the optional package timm (pip install timm)")
        names = list(TIMM_DEFAULT) if args.timm == "" else timm.list_models(args.timm)
        out += [("timm", n) for n in names if not args.models or n in args.models]
    return out


def _fmt(row: dict) -> str:
    share = row["permuted_share"]
    share = f"{100 * share:.1f}%" if share != "" else ""
    params = f"{row['params'] / 1e6:.1f}M" if row["params"] != "" else ""
    status = row["status"] if len(row["status"]) < 40 else row["status"][:37] + "..."
    return (f"{row['source'][:5]:<5} {row['model']:<32} {params:>7} {row['input']:>7} "
            f"{status:<40} {row['groups']!s:>6} {share:>7} {row['max_rel_error']!s:>8} "
            f"{row['trace_s']!s:>6} {row['check_s']!s:>6} {row['recovered']!s:>7} "
            f"{_short(row['unpermuted'])[:60]}")


def summarize(rows: list[dict]) -> str:
    """Counts (built, traced, equivalent, >= 99 % of the parameters permuted), the models
    skipped, and every built model below that mark or not equivalent, with why."""
    built = [r for r in rows if r["input"]]
    traced = [r for r in built if r["groups"] != ""]
    ok = [r for r in traced if r["status"] == "ok"]
    full = [r for r in traced if r["permuted_share"] >= 0.99]
    lines = [f"{len(rows)} models: {len(built)} built, {len(traced)} traced, {len(ok)} "
             f"equivalent; {len(full)} of the {len(built)} built "
             f"({100 * len(full) / max(len(built), 1):.0f}%) have >= 99% of their parameters "
             "on a permuted axis"]
    skipped = [r["model"] for r in rows if r["status"].startswith("skipped")]
    if skipped:
        lines.append(f"skipped (too large): {', '.join(skipped)}")
    for r in rows:
        if r["status"].startswith("skipped") or (r in ok and r in full):
            continue
        parts = [f"{100 * r['permuted_share']:.1f}% permuted"] if r in traced else []
        parts += [r["status"]] if r["status"] != "ok" else []
        parts += [r["unpermuted"][:300]] if r["unpermuted"] else []
        lines.append(f"  {r['source']}:{r['model']}: {'; '.join(parts)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="only these names")
    parser.add_argument("--no-torchvision", dest="torchvision", action="store_false")
    parser.add_argument("--timm", nargs="?", const="", default=None, metavar="PATTERN",
                        help="also timm models: a chosen subset, or those matching PATTERN")
    parser.add_argument("--recover", nargs="*", default=[], metavar="NAME",
                        help="planted-permutation recovery by weight matching for these models")
    parser.add_argument("--first-solve", choices=["all", "visited"], default="all",
                        help="weight matching's first_solve for --recover (all: Git Re-Basin)")
    parser.add_argument("--max-params", type=float, default=350e6)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    models = _models(args)
    header = (f"{'src':<5} {'model':<32} {'params':>7} {'input':>7} {'status':<40} {'groups':>6} "
              f"{'perm%':>7} {'err':>8} {'tr s':>6} {'ch s':>6} {'recov':>7} unpermuted")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for source, name in models:
        row = run(source, name, args.max_params, set(args.recover), args.timeout,
                  args.first_solve)
        rows.append(row)
        print(_fmt(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
    print()
    print(summarize(rows))


if __name__ == "__main__":
    main()

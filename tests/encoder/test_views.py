"""Test-time views and ensembles on the real SFace weights and a real aligned face."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.assets import photo
from encoder.views import Ensemble, View, ViewScheme, default_ensemble, gray_crops


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """(2, 112, 112, 3): the aligned Tom Hanks crop and a brighter copy."""
    tom = np.array(Image.open(photo("Tom_Hanks_54745.png")).convert("RGB"))
    brighter = np.clip(tom.astype(np.int16) + 30, 0, 255).astype(np.uint8)
    return np.stack([tom, brighter])


def test_view_scheme_id_round_trips():
    scheme = ViewScheme.product(["sface"], flips=(False, True), grays=(False, True))
    assert scheme.id == "sface:orig,sface:orig+gray,sface:flip,sface:flip+gray"
    assert ViewScheme.parse(scheme.id) == scheme


def test_gm_arc_twelve_view_scheme_is_expressible():
    scheme = ViewScheme.product(["r50", "r100", "r100_glint"], flips=(False, True), grays=(False, True))
    assert len(scheme) == 12
    assert ViewScheme.parse(scheme.id) == scheme
    assert scheme.encoders == ("r50", "r100", "r100_glint")


def test_short_view_ids_parse_to_canonical_ones():
    assert ViewScheme.parse("sface,sface:gray").id == "sface:orig,sface:orig+gray"


@pytest.mark.parametrize("bad", ["sface:sideways", "sface:gray+flip", "sface:orig+blur", "a,b:x"])
def test_malformed_view_ids_are_rejected(bad):
    with pytest.raises(ValueError):
        ViewScheme.parse(bad)


def test_duplicate_views_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        ViewScheme((View("sface"), View("sface")))


def test_ensemble_refuses_members_with_different_alignments(sface):
    from encoder.models.gm_casia import GMCasia

    with pytest.raises(ValueError, match="alignment"):
        Ensemble({"sface": sface, "gm": GMCasia().eval()}, ViewScheme.parse("sface:orig,gm:orig"))


def test_flip_view_of_flipped_crop_equals_orig_view_of_crop(sface, crops):
    ensemble = Ensemble({"sface": sface}, ViewScheme.product(["sface"], flips=(False, True)))
    direct = ensemble.embed(crops)
    mirrored = ensemble.embed(crops[:, :, ::-1].copy())
    assert direct.shape == (2, 2, 128)
    np.testing.assert_allclose(mirrored[:, 1], direct[:, 0], atol=1e-6)
    np.testing.assert_allclose(mirrored[:, 0], direct[:, 1], atol=1e-6)
    assert not np.allclose(direct[:, 0], direct[:, 1], atol=1e-3)


def test_embeddings_are_unit_length_per_view(sface, crops):
    ensemble = Ensemble({"sface": sface}, ViewScheme.product(["sface"], (False, True), (False, True)))
    emb = ensemble.embed(crops)
    assert emb.dtype == np.float32 and emb.shape == (2, 4, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_gray_view_is_luma_replicated(sface, crops):
    ensemble = Ensemble({"sface": sface}, ViewScheme.parse("sface:orig,sface:orig+gray"))
    gray = gray_crops(crops)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    luma = 0.299 * crops[..., 0] + 0.587 * crops[..., 1] + 0.114 * crops[..., 2]
    assert np.abs(gray[..., 0] - luma).max() <= 1.0
    np.testing.assert_allclose(ensemble.embed(crops)[:, 1], ensemble.embed(gray)[:, 0], atol=1e-6)


def test_view_inputs_feed_features_and_head_and_say_which_are_flipped(sface, crops):
    ensemble = Ensemble({"sface": sface}, ViewScheme.product(["sface"], flips=(False, True)))
    orig, flip = ensemble.view_inputs(crops)
    assert (orig.flipped, flip.flipped) == (False, True)
    assert orig.inputs.shape == (2, 3, 112, 112)
    assert torch.equal(torch.flip(orig.inputs, dims=[-1]), flip.inputs)
    with torch.no_grad():
        emb = flip.encoder.head(flip.encoder.features(flip.inputs))
    emb = torch.nn.functional.normalize(emb, dim=1).numpy()
    np.testing.assert_allclose(emb, ensemble.embed(crops)[:, 1], atol=1e-5)


def test_members_of_different_sizes_are_zero_padded_without_changing_cosines(sface, crops):
    from encoder.models.iresnet import iresnet

    torch.manual_seed(0)
    r50 = iresnet("iresnet50").eval()
    ensemble = Ensemble({"sface": sface, "r50": r50}, ViewScheme.parse("sface:orig,r50:orig"))
    emb = ensemble.embed(crops)
    assert ensemble.dims == (128, 512) and emb.shape == (2, 2, 512)
    assert not emb[:, 0, 128:].any()
    alone = Ensemble({"sface": sface}, ViewScheme.parse("sface:orig")).embed(crops)
    np.testing.assert_allclose(emb[:, 0, :128], alone[:, 0], atol=1e-6)


def test_default_ensemble_is_sface_with_optional_flip():
    assert default_ensemble().scheme.id == "sface:orig"
    flip = default_ensemble(flip=True)
    assert flip.scheme.id == "sface:orig,sface:flip" and flip.alignment == "arcface112"

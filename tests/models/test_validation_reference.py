"""ValidationSet's reference: a predicted shift read against all the context's controls or the drawn ones."""

import numpy as np
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.eval import metrics as M
from pertflow.models.validation import ValidationSet


@pytest.fixture(scope="module")
def view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    return SplitView(data, make_split(data, "random", test_fraction=0.3))


def test_no_change_scores_zero_against_the_drawn_controls_and_noise_against_all(view):
    drawn = ValidationSet(view, seed=0, reference="drawn")
    every = ValidationSet(view, seed=0)
    assert len(drawn) > 2 and every.reference == "all-controls"
    no_change = lambda pert, ctx, controls: controls  # noqa: E731
    assert drawn.score(no_change).pearson_top20_de == 0.0
    assert every.score(no_change).pearson_top20_de != 0.0  # the draw's deviation from all controls' mean
    assert drawn.score(no_change).edistance == pytest.approx(every.score(no_change).edistance)


def test_a_shift_is_read_as_itself_against_the_drawn_controls(view):
    """An upward shift (nothing clipped at 0): its Pearson against the real shift, whatever was drawn."""
    drawn = ValidationSet(view, seed=0, reference="drawn")
    shifts = {(g.perturbation, g.context): np.random.default_rng(i).uniform(0.1, 1.0, g.real.shape[1])
              for i, g in enumerate(drawn.groups)}
    shift = lambda pert, ctx, controls: controls + shifts[(pert, ctx)]  # noqa: E731
    expected = [M.pearson_r(shifts[(g.perturbation, g.context)][g.de_genes], (g.real.mean(0) - g.control_mean)[g.de_genes])
                for g in drawn.groups]
    assert drawn.score(shift).pearson_top20_de == pytest.approx(float(np.average(expected, weights=drawn.weights)), abs=1e-5)
    other_draw = ValidationSet(view, seed=0, reference="drawn", n_generated=8)
    assert other_draw.score(shift).pearson_top20_de == pytest.approx(drawn.score(shift).pearson_top20_de, abs=1e-5)


def test_an_unknown_reference_is_refused(view):
    with pytest.raises(ValueError, match="reference must be"):
        ValidationSet(view, reference="test")

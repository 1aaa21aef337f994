"""Optional capabilities are protocols a model class satisfies, not attribute probes (issue 26)."""

import pytest

from pertflow import api
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.capabilities import EmbedsCells, GeneratesWithoutControls
from pertflow.models.registry import model_class
from pertflow.train.engine import GradCheckpointing


def test_each_model_class_has_the_capabilities_it_implements():
    assert issubclass(model_class("latent-shift"), EmbedsCells)
    assert not issubclass(model_class("cfm"), EmbedsCells)
    assert issubclass(model_class("cfmvc"), GeneratesWithoutControls)
    assert not issubclass(model_class("mean"), GeneratesWithoutControls)
    from pertflow.models.cfm.module import CFMModule

    assert issubclass(CFMModule, GradCheckpointing)


def test_generating_without_controls_from_a_model_that_cannot_is_refused(synthetic_adata, tmp_path):
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    mean = api.train("mean", SplitView(data, make_split(data, "random", test_fraction=0.25)), None, tmp_path / "mean")
    with pytest.raises(InputError, match="model 'mean' generates cells from control cells only"):
        api.generate_expression(mean, "G0001")

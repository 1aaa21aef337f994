"""Dose: synthetic data with a dose-response, and the perturbation encoder's log-dose embedding
interpolating an unseen middle dose between its neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertflow.data.synthetic import make_synthetic
from pertflow.nn.embeddings import GeneEncoder
from pertflow.nn.perturbation import PerturbationEncoder

DOSES = (0.1, 0.3, 1.0, 3.0, 10.0)
HELD_OUT = 1.0  # the middle dose: never trained on


@pytest.fixture(scope="module")
def dosed():
    adata = make_synthetic(n_genes=60, n_contexts=1, n_singles=4, n_combos=0, cells_per_group=80, n_effect_genes=15,
                           controls_per_context=200, genetic=False, doses=DOSES, effect_scale=1.2, seed=2)
    x = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    pert, dose = adata.obs["perturbation"].astype(str).to_numpy(), adata.obs["dose"].to_numpy()
    ctrl = x[pert == "control"].mean(0)
    drugs = sorted(set(pert) - {"control"})
    shifts = {(d, v): x[(pert == d) & (dose == v)].mean(0) - ctrl for d in drugs for v in DOSES}
    return adata, drugs, shifts


def test_synthetic_dose_response_is_monotone_in_dose(dosed):
    adata, drugs, shifts = dosed
    truth = adata.uns["synthetic"]
    assert np.all(np.diff(truth["dose_scale"]) > 0) and (adata.obs.loc[adata.obs["perturbation"] == "control", "dose"] == 0).all()
    lfc = truth["lfc"][1:, 0]  # (drugs, genes), the full-dose response
    sizes = np.zeros(len(DOSES))  # the mean shift along each drug's response, over its clearly moved genes
    for i, d in enumerate(drugs):
        strong = np.abs(lfc[i]) > 0.8
        sizes += [(np.sign(lfc[i][strong]) * shifts[(d, v)][strong]).mean() for v in DOSES]
    assert np.all(np.diff(sizes) > 0), sizes


def test_dose_embedding_is_zero_until_trained_and_for_no_dose():
    enc = PerturbationEncoder(6, 2, 0, 8, dose=True)
    genes = GeneEncoder(6, 8, padding_idx=0)
    ids = torch.tensor([[2], [3]])
    np.testing.assert_allclose(enc(ids, genes, torch.tensor([1.0, 10.0])).detach(), enc(ids, genes).detach())
    with torch.no_grad():
        enc.dose[-1].weight.normal_()
    emb = enc.dose_embedding(torch.tensor([0.0, 1.0, 10.0]))
    assert emb[0].abs().sum() == 0 and (emb[1] - emb[2]).abs().sum() > 0
    with pytest.raises(ValueError, match="without dose"):
        PerturbationEncoder(6, 2, 0, 8).dose_embedding(torch.tensor([1.0]))


def test_unseen_middle_dose_is_predicted_between_its_neighbours(dosed):
    adata, drugs, shifts = dosed
    torch.manual_seed(0)
    n_genes, width = adata.n_vars, 16
    enc = PerturbationEncoder(2 + len(drugs), 2, 0, width, dose=True)  # tokens: <pad>, <unk>, then the drugs
    genes = GeneEncoder(2 + len(drugs), width, padding_idx=0)
    # a nonlinear head, as the flow's backbone: the dose scales each drug's own response
    head = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.SiLU(), torch.nn.Linear(64, n_genes))
    train = [(i, v) for i in range(len(drugs)) for v in DOSES if v != HELD_OUT]
    ids = torch.tensor([[2 + i] for i, _ in train])
    dose = torch.tensor([v for _, v in train])
    target = torch.tensor(np.stack([shifts[(drugs[i], v)] for i, v in train]), dtype=torch.float32)
    params = [*enc.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(600):
        opt.zero_grad()
        loss = ((head(enc(ids, genes, dose)) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    lfc = adata.uns["synthetic"]["lfc"][1:, 0]
    with torch.no_grad():
        middle = head(enc(torch.tensor([[2 + i] for i in range(len(drugs))]), genes,
                          torch.full((len(drugs),), HELD_OUT))).numpy()
    between, real_error, neighbour_error = [], [], []
    for i, d in enumerate(drugs):
        strong = np.abs(lfc[i]) > 0.8  # genes the drug moves clearly
        low, high = shifts[(d, 0.3)][strong], shifts[(d, 3.0)][strong]
        between.append((np.minimum(low, high) <= middle[i, strong]) & (middle[i, strong] <= np.maximum(low, high)))
        real_error.append(np.abs(middle[i, strong] - shifts[(d, HELD_OUT)][strong]).mean())
        neighbour_error.append(min(np.abs(low - shifts[(d, HELD_OUT)][strong]).mean(),
                                   np.abs(high - shifts[(d, HELD_OUT)][strong]).mean()))
    assert np.concatenate(between).mean() > 0.85
    assert np.mean(real_error) < np.mean(neighbour_error)  # closer to the real middle dose than either neighbour

"""scGPT's special tokens: the one place they are spelled.

scGPT's vocabularies put ``<pad>``, ``<cls>`` and ``<eoc>`` beside the gene symbols (its loaders
append any that are missing, in this order). pertflow's own token vocabulary
(:mod:`pertflow.data.vocab`) is a different one, with its own special tokens.
"""

PAD = "<pad>"
CLS = "<cls>"
EOC = "<eoc>"
SPECIAL_TOKENS = (PAD, CLS, EOC)

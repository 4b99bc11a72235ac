"""Megatron ``GPTDataset``s blended from a mixture, with index caches built once.

:func:`build_gpt_datasets` turns a :class:`~megaphi.data.mixture.Mixture` into Megatron-Core's
blended datasets through ``BlendedMegatronDatasetBuilder``: when torch.distributed is
initialised, rank 0 builds the shuffle/sample index caches under ``cache_dir`` and the other
ranks load them after a barrier. Before that, every dataset's recorded tokenizer is checked
against the run's tokenizer and the model's vocabulary.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

from megaphi.data.mixture import Mixture
from megaphi.platform import single_process_group

logger = logging.getLogger(__name__)


class _DatasetTokenizer:
    """The three facts ``GPTDataset`` reads from a tokenizer."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod_id
        self.pad = tokenizer.pad_id
        self.unique_identifiers = {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint}


def check_datasets_tokenizer(prefixes: Sequence[str], tokenizer, model_vocab_size: int) -> None:
    """Refuse datasets that are incomplete, empty, tokenised differently from ``tokenizer`` or
    beyond the model's vocabulary (:class:`PreprocessError`, naming the prefix and the fix)."""
    from megaphi.data.preprocess import (DOCUMENT_NOUNS, PreprocessError, check_complete,
                                         read_meta)
    from megaphi.data.tokenizer import check_tokenizer_fits_model

    try:
        check_tokenizer_fits_model(tokenizer, model_vocab_size)
    except ValueError as exc:
        raise PreprocessError(str(exc)) from None
    for prefix in prefixes:
        meta = read_meta(prefix)
        check_complete(prefix, meta)
        if meta["documents"] == 0:
            noun = DOCUMENT_NOUNS.get(meta.get("kind"), "documents")
            raise PreprocessError(
                f"{prefix}: holds no {noun} (its inputs {', '.join(meta['inputs'])} gave "
                f"none); remove it from data.mixture or preprocess data that has {noun}")
        recorded = meta["tokenizer"]
        if recorded["fingerprint"] != tokenizer.fingerprint:
            raise PreprocessError(
                f"{prefix}: tokenised with {recorded['name']} (fingerprint "
                f"{recorded['fingerprint']}), but the run uses {tokenizer.name} "
                f"({tokenizer.fingerprint}); re-run tools/preprocess_data.py with the run's "
                "tokenizer or set data.tokenizer to match")
        if recorded["vocab_size"] > model_vocab_size:
            raise PreprocessError(f"{prefix}: token ids go up to {recorded['vocab_size'] - 1} "
                                  f"but model.vocab_size is {model_vocab_size}; raise "
                                  "model.vocab_size or preprocess with a smaller tokenizer")


def build_gpt_datasets(mixture: Mixture, tokenizer, seq_length: int, seed: int,
                       samples: Sequence[int], cache_dir: Optional[str],
                       model_vocab_size: int) -> List[Optional[object]]:
    """``[train, valid, test]`` blended ``GPTDataset``s with at least ``samples[i]`` samples each
    (``None`` for a split the mixture lacks or that needs 0 samples)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_datasets_tokenizer(mixture.all_prefixes(), tokenizer, model_vocab_size)
    blends = [mixture.blend(split) if n > 0 else None
              for split, n in zip(("train", "valid", "test"), samples)]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blends,
        path_to_cache=cache_dir,
        tokenizer=_DatasetTokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model applies the causal mask itself
    )
    sizes = [n if b is not None else 0 for n, b in zip(samples, blends)]
    # Megatron's blended dataset asks torch.distributed for the rank whenever it caches.
    with single_process_group():
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return list(datasets)

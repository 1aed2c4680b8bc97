"""Crosscoder model diffing (Minder, Dumas et al. 2025, "Robustly identifying concepts introduced during chat
fine-tuning using crosscoders"): BatchTopK and L1 crosscoders over the base model's and the diffed model's
activations, each latent's relative decoder norm, Latent Scaling, and the paper's classification of latents.

- `model`: the crosscoder (`Crosscoder`, the sparsities `SPARSITIES`, `relative_norm_difference`);
- `train`: training on activations in memory (`TrainSettings`, `train_crosscoder`);
- `scaling`: Latent Scaling's closed-form β and ν, the thresholds, the classification;
- `activations`: the no-network corpus and the paired activations with their resumable cache;
- `pipeline`: `crosscoder_diff`, everything into one output directory (`metadit diff crosscoder`).
"""

from metadit.eval.crosscoder.model import SPARSITIES, Crosscoder, batch_top_k, relative_norm_difference
from metadit.eval.crosscoder.pipeline import CrosscoderSettings, crosscoder_diff
from metadit.eval.crosscoder.scaling import THRESHOLDS, Thresholds, analyse, classify
from metadit.eval.crosscoder.train import TrainSettings, train_crosscoder

__all__ = ["SPARSITIES", "THRESHOLDS", "Crosscoder", "CrosscoderSettings", "Thresholds", "TrainSettings", "analyse",
           "batch_top_k", "classify", "crosscoder_diff", "relative_norm_difference", "train_crosscoder"]

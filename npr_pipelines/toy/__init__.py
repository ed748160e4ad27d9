"""The embedded toy world: synthetic problems, a local tokenizer and a tiny Qwen3 base model.

- ``problems``: two problem families with independent sub-problems (``sum_of_products``,
  ``candidate_search``), difficulty ``k`` = 2..5, hash-based train/dev/test splits.
- ``solutions``: sequential and parallel-format reference solutions, a noisy teacher, corruptions.
- ``tokenizer``: a deterministic byte-level BPE tokenizer with Qwen's specials and chat template,
  without the tag tokens (stage 2 adds them).
- ``model``: the ~1M-parameter ``Qwen3ForCausalLM``.
- ``bootstrap``: ``bootstrap_base_model(config) -> path``, trained on the CPU in about 3 minutes and
  cached by config hash.
- ``evaluate``: ``evaluate_toy`` (batched HF ``generate``; sequential decoding).
- ``profiles``: every later stage's toy knobs (``default`` and ``small``).
"""

from npr_pipelines.toy.bootstrap import (
    BootstrapConfig,
    MixtureConfig,
    TrainConfig,
    bootstrap_base_model,
    bootstrap_manifest,
)
from npr_pipelines.toy.evaluate import evaluate_toy, is_correct
from npr_pipelines.toy.model import ModelConfig, build_model, load_model, save_model
from npr_pipelines.toy.problems import (
    CANDIDATE_SEARCH,
    DEV,
    FAMILIES,
    SPLITS,
    SUM_OF_PRODUCTS,
    TEST,
    TRAIN,
    ProblemConfig,
    ToyProblem,
    generate_problems,
    make_problem,
)
from npr_pipelines.toy.profiles import DEFAULT, PROFILES, SMALL, ToyProfile, get_profile
from npr_pipelines.toy.solutions import (
    CORRUPTIONS,
    TeacherNoise,
    corrupt,
    parallel_solution,
    parallel_trace,
    sequential_solution,
)
from npr_pipelines.toy.tokenizer import (
    TOY_COT_PROMPT,
    TOY_INSTRUCTION,
    TOY_PROMPT,
    TokenizerConfig,
    build_tokenizer,
)

__all__ = [
    "CANDIDATE_SEARCH",
    "CORRUPTIONS",
    "DEFAULT",
    "DEV",
    "FAMILIES",
    "PROFILES",
    "SMALL",
    "SPLITS",
    "SUM_OF_PRODUCTS",
    "TEST",
    "TOY_COT_PROMPT",
    "TOY_INSTRUCTION",
    "TOY_PROMPT",
    "TRAIN",
    "BootstrapConfig",
    "MixtureConfig",
    "ModelConfig",
    "ProblemConfig",
    "TeacherNoise",
    "TokenizerConfig",
    "ToyProblem",
    "ToyProfile",
    "TrainConfig",
    "bootstrap_base_model",
    "bootstrap_manifest",
    "build_model",
    "build_tokenizer",
    "corrupt",
    "evaluate_toy",
    "generate_problems",
    "get_profile",
    "is_correct",
    "load_model",
    "make_problem",
    "parallel_solution",
    "parallel_trace",
    "save_model",
    "sequential_solution",
]

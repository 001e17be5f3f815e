"""kdtrain: train students from teacher datasets (text-KD and sparse top-k logit KD) on TRL.

    kdtrain run --data <teacher dataset> --student <spec> --mode logit --loss fkl --out runs/s1

Modules: `config` (the one typed config; CLI help and YAML recipes come from it), `data`
(teacher dataset -> tokenised examples + the collator), `losses` (sparse divergences fused with
the LM head), `student` (build the student), `trainer` (the `SFTTrainer` subclass), `run` (the
recipe: load -> build -> train -> save), `cli` (typer). Recipes live in `kdtrain/recipes/`.
"""

__version__ = "0.1.0"

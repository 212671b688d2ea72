"""``python -m grpo_plugins_trl.grpo``: TRL's ``trl grpo`` training command, with grpo-plugins methods.

Takes everything ``trl grpo`` takes — a model (``model_name_or_path``), a dataset by name or local path
(``dataset_name``; also a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file or a folder
written by ``save_to_disk``), reward functions by registry name or import path (``reward_funcs``),
every ``GRPOConfig`` field from a YAML file (``--config run.yaml``) or flags — plus ``grpo_plugins:``,
and trains :class:`~grpo_plugins_trl.PluginGRPOTrainer` with TRL's own progress bar and logging
(``report_to``)::

    # run.yaml
    model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
    dataset_name: data/train.jsonl
    reward_funcs: [accuracy_reward]                 # a TRL registry name or an import path
    output_dir: outputs/run
    learning_rate: 1.0e-6
    grpo_plugins:
      - knapsack_rl: {max_n: 64}
      - ngrpo: {}

    python -m grpo_plugins_trl.grpo --config run.yaml --max_steps 100   # or: grpo-plugins train --config run.yaml

Before anything loads, the run config is checked (:func:`grpo_plugins_trl.checks.prepare_run`, the
same check ``grpo-plugins check run.yaml`` runs): every unknown key, refused value, reward function
that does not load, method that cannot be built and TRL setting the methods cannot run with is
reported at once, and the command exits with status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import yaml

from grpo_plugins_trl.checks import prepare_run


def read_config(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """The YAML mapping named by ``--config`` (empty without it) and the remaining flags."""
    argv = list(argv)
    if "--config" not in argv:
        return {}, argv
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise SystemExit("error: --config needs a YAML file")
    path = argv[index + 1]
    del argv[index:index + 2]
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"error: cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise SystemExit(f"error: Config file {path} must contain a YAML mapping.")
    return config, argv


def main(argv: Sequence[str] | None = None) -> int:
    """Check the run config, train, save the model (and push it when ``push_to_hub``); 0 on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from grpo_plugins_trl.checks import parser_dataclasses
        from trl import TrlParser

        TrlParser(parser_dataclasses(), prog="python -m grpo_plugins_trl.grpo").print_help()
        return 0
    config, flags = read_config(argv)
    for key, value in (config.get("env") or {}).items() if isinstance(config.get("env"), dict) else ():
        os.environ[key] = str(value)  # as TrlParser does, before anything reads the environment
    run, problems = prepare_run(config, flags)
    if problems:
        print(f"error: the run cannot start ({len(problems)} problem{'s' if len(problems) > 1 else ''}):", file=sys.stderr)
        for problem in problems:
            print("- " + problem.replace("\n", "\n  "), file=sys.stderr)
        return 1
    train(run)
    return 0


def train(run) -> None:
    """Build :class:`PluginGRPOTrainer` from a checked run (as ``trl grpo`` builds ``GRPOTrainer``) and train."""
    from trl import get_peft_config, get_quantization_config

    from grpo_plugins_trl.trainer import PluginGRPOTrainer

    script_args, training_args, model_args = run.script_args, run.training_args, run.model_args
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = run.dataset[script_args.dataset_test_split]
    trainer = PluginGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=run.reward_funcs,
        args=training_args,
        train_dataset=run.train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group
        trainer.end()


if __name__ == "__main__":
    sys.exit(main())

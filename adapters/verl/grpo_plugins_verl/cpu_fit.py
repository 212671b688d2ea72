"""verl's own training loop (``PPOTrainer.fit``) on CPU, with only the GPU parts stood in for.

A test harness: it runs the adapter's ``grpo_plugins`` trainer through verl 0.9.1's real V1
``fit()`` on a local Ray cluster and a real TransferQueue. verl 0.9.1 cannot start a job on a
CPU-only machine (no CPU platform, NCCL process groups, a vLLM/SGLang/TRT-LLM rollout server), so
the parts that need a GPU are replaced; everything else is verl's code.

Real verl code that runs: Hydra config composition (``ppo_trainer``), the trainer class from
``get_trainer_cls`` with its ``__init__``, ``_init_tokenizer``, ``_init_dataloader`` (``RLHFDataset``,
``StatefulDataLoader``), ``_load_checkpoint``/``_save_checkpoint``, ``fit()`` and ``step``/
``_step_once`` (``prepare_step`` and round submission, ``ReplayBuffer.sample``, ``_balance_batch`` and
its padding rows, ``_compute_old_log_prob``, ``_compute_ref_log_prob``, ``_compute_advantage`` with
``compute_advantage_for_multi_trajectories``, ``_update_actor``, ``_compute_metrics``,
``tq.kv_clear``); TransferQueue (controller and storage as Ray actors); the actor worker's
``ActorRolloutRefWorker.compute_log_prob``/``compute_ref_log_prob``/``update_actor``/``set_loss_fn``/
checkpoint methods with their ``register``/``tqbridge`` decorators, ``TrainingWorker.train_mini_batch``/
``train_batch``/``infer_batch``, ``BaseEngine.train_batch``/``infer_batch``, verl's micro-batching
(``prepare_micro_batches``, ``postprocess_batch_func``) and its loss (``workers/utils/losses.ppo_loss``
calling the registered policy loss, or whatever loss the trainer installs with ``set_loss_fn``); the
agent loop (``AgentLoopWorkerTQ.generate_sequences``/``_run_prompt`` with the per-prompt
``__rollout_n__``, ``SingleTurnAgentLoop`` with the chat template, ``_agent_loop_postprocess`` writing
trajectories to TransferQueue); the reward loop (``RewardLoopWorker`` with verl's reward manager and
the run's ``reward.custom_reward_function``).

Stand-ins (:class:`CPUEngine`, :class:`HFGenerateClient`, :func:`build_worker_group`):

- the FSDP engine -> :class:`CPUEngine`: the HF model on CPU in one process; the forward writes
  log-probs and entropies in the engine's no-padding nested layout, AdamW steps with gradient
  clipping; a one-process gloo group stands in for the data-parallel group;
- the Ray worker group -> the worker object called in-process (the loss function and the old-policy
  probe's jobs and results still go through a cloudpickle round trip, as over Ray);
- the vLLM server -> :class:`HFGenerateClient`, HF ``generate`` with the actor's own module, so the
  weight sync is a no-op;
- Ray actors of the agent-loop and reward workers -> the same classes run in this process (the
  agent loop on its own event-loop thread).

Not covered: FSDP sharding, NCCL collectives, vLLM weight sync, multi-node Ray, the
``AgentLoopManagerTQ`` chunking over several workers, dynamic batch sizes.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from grpo_plugins.ops import token_log_probs

TINY_OVERRIDES = (
    "data.train_batch_size=2",
    "data.max_prompt_length=32",
    "data.max_response_length=6",
    "data.dataloader_num_workers=0",
    "actor_rollout_ref.actor.optim.lr=1e-3",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.use_dynamic_bsz=False",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
    "reward.custom_reward_function.name=compute_score",
    "reward.num_workers=1",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "trainer.n_gpus_per_node=1",
    "trainer.nnodes=1",
    "trainer.total_epochs=100",
    "trainer.val_before_train=False",
    "trainer.test_freq=-1",
    "trainer.logger=[console]",
    "trainer.project_name=grpo_plugins",
    "trainer.experiment_name=cpu_fit",
)
"""verl overrides of a tiny CPU run: 2 prompts x 4 completions per step, one mini-batch of 8 rows in
two micro-batches of 4 (so micro-batch aggregation is exercised), responses of at most 6 tokens."""


# ---------------------------------------------------------------------------------------------- engine
class CPUEngine:
    """Stands in for verl's FSDP engine: an HF causal LM on CPU (one data-parallel rank).

    It implements the ``BaseEngine`` methods ``TrainingWorker`` calls; verl's own
    ``BaseEngine.train_batch``/``infer_batch`` drive it (they are bound onto this class below).
    ``forward_backward_batch`` follows ``FSDPEngine.forward_backward_batch``: global token count and
    dp size into the batch, verl's ``prepare_micro_batches``, forward, loss, backward per micro-batch,
    verl's ``postprocess_batch_func``.
    """

    def __init__(self, module: torch.nn.Module, lr: float = 0.0, clip_grad: float = 1.0, trainable: bool = True):
        self.module = module
        self.clip_grad = clip_grad
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr) if trainable else None
        self.optimizer_steps = 0

    from verl.workers.engine.base import BaseEngine as _Base

    train_batch = _Base.train_batch
    infer_batch = _Base.infer_batch
    del _Base

    # the parts of BaseEngine that depend on the backend
    def train_mode(self, **kwargs):
        self.module.train()
        return nullcontext()

    def eval_mode(self, **kwargs):
        self.module.eval()
        return nullcontext()

    def disable_adapter(self):
        return nullcontext()

    def get_data_parallel_size(self) -> int:
        return 1

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_group(self):
        return None

    def is_mp_src_rank_with_outputs(self) -> bool:
        return True

    def optimizer_zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def optimizer_step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.optimizer_steps += 1
        return float(grad_norm)

    def lr_scheduler_step(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state, os.path.join(local_path, "cpu_engine.pt"))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        state = torch.load(os.path.join(local_path, "cpu_engine.pt"), weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def forward_backward_batch(self, data, loss_function, forward_only: bool = False) -> dict:
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.utils import postprocess_batch_func, prepare_micro_batches

        loss_mask = data["loss_mask"]
        tokens = loss_mask.values().sum() if loss_mask.is_nested else loss_mask.sum()
        tu.assign_non_tensor(data, batch_num_tokens=int(tokens.item()), dp_size=1)
        micro_batches, indices = prepare_micro_batches(data=data, dp_group=None, same_micro_num_in_dp=True)
        outputs = []
        for micro_batch in micro_batches:
            with torch.no_grad() if forward_only else nullcontext():
                loss, output = self.forward_step(micro_batch, loss_function, forward_only)
                if not forward_only:
                    loss.backward()
                    output.pop("model_output", None)
            outputs.append(output)
        return postprocess_batch_func(output_lst=outputs, indices=indices, data=data)

    def forward_step(self, micro_batch, loss_function, forward_only: bool):
        """Log-probs (of the next token) and entropies for every position, nested per sequence."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.utils import detach_tree

        input_ids = micro_batch["input_ids"]  # nested (B, j) prompt + response
        lengths = input_ids.offsets().diff()
        padded = input_ids.to_padded_tensor(padding=0)
        positions = micro_batch["position_ids"].to_padded_tensor(padding=0)
        attention = (torch.arange(padded.shape[1]) < lengths[:, None]).long()
        temperature = float(tu.get_non_tensor_data(micro_batch, "temperature", default=1.0) or 1.0)
        logits = self.module(input_ids=padded, attention_mask=attention, position_ids=positions, use_cache=False).logits
        labels = torch.roll(padded, shifts=-1, dims=1)  # position t scores token t + 1
        with_entropy = bool(tu.get_non_tensor_data(micro_batch, "calculate_entropy", default=False))
        log_probs, entropy = token_log_probs(logits.float(), labels, temperature, entropy=with_entropy)
        valid = attention.bool()
        model_output = {"log_probs": _nested(log_probs[valid], lengths)}
        if with_entropy:
            model_output["entropy"] = _nested(entropy[valid], lengths)
        if loss_function is not None:
            loss, metrics = loss_function(model_output=model_output, data=micro_batch, dp_group=None)
        else:
            loss, metrics = torch.tensor(1.0), {}
        return loss, {"model_output": detach_tree(model_output), "loss": loss.detach().item(), "metrics": metrics}


def _nested(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return torch.nested.nested_tensor_from_jagged(values, offsets)


# ---------------------------------------------------------------------------------------------- workers
class _FlopsCounter:
    """The engine's MFU needs a GPU's peak FLOPs; on CPU it is reported as 0."""

    def estimate_flops(self, *args, **kwargs):
        return 0.0, 1.0


def _training_worker(engine: CPUEngine, engine_config: Any, model_config: Any):
    """verl's ``TrainingWorker`` around ``engine`` (its methods are verl's; its ``__init__``, which
    builds an FSDP engine in a Ray worker, is skipped)."""
    from verl.utils.profiler import DistProfiler
    from verl.workers.engine_workers import TrainingWorker

    worker = object.__new__(TrainingWorker)
    worker.engine = engine
    worker.engine_config = engine_config
    worker.model_config = model_config
    worker.device_name = "cpu"
    worker.profiler = DistProfiler(rank=0, config=None)
    worker.flops_counter = _FlopsCounter()
    worker.loss_fn = None
    return worker


class InProcessWorkerGroup:
    """The actor (and reference) worker group: verl's ``ActorRolloutRefWorker`` methods called in this
    process. ``set_loss_fn`` sends the function through cloudpickle, as Ray does."""

    def __init__(self, worker: Any):
        self.worker = worker
        self._dispatch_info: dict[str, list[int]] = {}

    def _query_dispatch_info(self, role: str) -> list[int]:
        return [0]

    def set_loss_fn(self, loss_fn) -> None:
        import ray.cloudpickle as cloudpickle

        self.worker.set_loss_fn(cloudpickle.loads(cloudpickle.dumps(loss_fn)))

    def probe_old_policy(self, job) -> list:
        """The ranks' results (one rank here), the job and the result sent through cloudpickle as over Ray."""
        import ray.cloudpickle as cloudpickle

        result = self.worker.probe_old_policy(cloudpickle.loads(cloudpickle.dumps(job)))
        return [cloudpickle.loads(cloudpickle.dumps(result))]

    def __getattr__(self, name: str):
        return getattr(self.worker, name)


def build_worker_group(config: Any, model: torch.nn.Module) -> InProcessWorkerGroup:
    """The actor worker as ``ActorRolloutRefWorker.init_model`` configures it (actor engine config,
    ``partial(ppo_loss, config=ActorConfig)``), plus a frozen reference copy when verl needs one. Its class is
    the adapter's :class:`~grpo_plugins_verl.workers.ProbeActorRolloutRefWorker` (verl's worker plus the
    old-policy probe)."""
    from verl.trainer.ppo.utils import need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    from grpo_plugins_verl.workers import ProbeActorRolloutRefWorker

    arr = config.actor_rollout_ref
    model_config = omega_conf_to_dataclass(arr.model)
    actor_config = omega_conf_to_dataclass(arr.actor)
    actor_config.model_config = model_config
    engine_config = actor_config.engine
    engine_config.use_dynamic_bsz = bool(arr.actor.use_dynamic_bsz)
    engine_config.infer_micro_batch_size_per_gpu = arr.rollout.log_prob_micro_batch_size_per_gpu
    engine_config.micro_batch_size_per_gpu = arr.actor.ppo_micro_batch_size_per_gpu
    engine_config.infer_max_token_len_per_gpu = arr.rollout.log_prob_max_token_len_per_gpu
    engine_config.max_token_len_per_gpu = arr.actor.ppo_max_token_len_per_gpu
    engine = CPUEngine(model, lr=float(arr.actor.optim.lr), clip_grad=float(arr.actor.optim.clip_grad))

    worker = object.__new__(ProbeActorRolloutRefWorker)
    worker.config = arr
    worker.role = "actor_rollout_ref"
    worker.enable_routing_replay = False
    worker.profiler = None
    worker._Worker__dispatch_dp_rank = {}
    worker._Worker__collect_dp_rank = {}
    for mesh in ("actor", "ref"):  # one data-parallel rank, which collects the outputs
        worker._register_dispatch_collect_info(mesh_name=mesh, dp_rank=0, is_collect=True)
    worker.actor = _training_worker(engine, engine_config, model_config)
    worker.actor.set_loss_fn(partial(ppo_loss, config=actor_config))
    if need_reference_policy(config):
        reference = copy.deepcopy(model).requires_grad_(False)
        ref_engine_config = copy.deepcopy(engine_config)
        ref_engine_config.infer_micro_batch_size_per_gpu = arr.ref.log_prob_micro_batch_size_per_gpu
        worker.ref = _training_worker(CPUEngine(reference, trainable=False), ref_engine_config, model_config)
    return InProcessWorkerGroup(worker)


# ---------------------------------------------------------------------------------------------- rollout
class HFGenerateClient:
    """Stands in for verl's ``LLMServerClient``: ``generate`` with HF ``generate`` on the actor's module.

    The rollout uses the actor's own parameters, so verl's weight sync has nothing to do.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_new_tokens: int):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.lock = threading.Lock()
        self.weights_version = 0
        """The trainer step of the weights (``LLMServerClient`` reports it per generation)."""

    async def generate(self, request_id, *, prompt_ids: list[int], sampling_params: dict, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        temperature = float(sampling_params.get("temperature", 1.0))
        options = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            top_k = int(sampling_params.get("top_k", -1))
            options.update(do_sample=True, temperature=temperature, top_p=float(sampling_params.get("top_p", 1.0)))
            options["top_k"] = top_k if top_k > 0 else None
        else:
            options.update(do_sample=False)
        with self.lock, torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            generated = self.model.generate(
                torch.tensor([prompt_ids]), return_dict_in_generate=True, output_logits=True, **options
            )
            self.model.train(was_training)
        output = generated.sequences[0, len(prompt_ids) :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in output:
            output = output[: output.index(eos) + 1]
        log_probs = None
        if sampling_params.get("logprobs"):  # the sampled tokens' log-probs at the sampling temperature
            logits = torch.cat(generated.logits)[: len(output)].float() / max(temperature, 1e-6)
            log_probs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(output)[:, None]).squeeze(-1).tolist()
        version = {"global_steps": self.weights_version, "min_global_steps": self.weights_version}
        version["max_global_steps"] = self.weights_version
        return TokenOutput(token_ids=output, log_probs=log_probs, stop_reason="completed", extra_fields=version)


class InlineActorHandle:
    """A Ray actor handle stand-in: ``handle.method.remote(*args)`` awaits ``obj.method(*args)`` in this process;
    called from outside the event ``loop`` the object lives on (the driver), it runs there and returns a future."""

    def __init__(self, obj: Any, loop: asyncio.AbstractEventLoop | None = None):
        self._obj = obj
        self._loop = loop

    def __getattr__(self, name: str):
        method = getattr(self._obj, name)
        loop = self._loop

        class _Remote:
            @staticmethod
            def remote(*args, **kwargs):
                result = method(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    if loop is not None and not _running_on(loop):
                        return asyncio.run_coroutine_threadsafe(result, loop)
                    return result

                async def done():
                    return result

                return done()

        return _Remote


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class InProcessAgentLoopManager:
    """Stands in for ``AgentLoopManagerTQ`` (a manager of Ray agent-loop workers): one
    ``AgentLoopWorkerTQ`` (verl's class, unwrapped from its Ray actor) on a background event loop."""

    def __init__(self, config: Any, llm_client: HFGenerateClient):
        from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
        from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="agent-loop")
        self.thread.start()
        worker_cls = AgentLoopWorkerTQ.__ray_actor_class__

        async def build():  # both workers bind to the event loop they are built on
            self.reward_handles = [InlineActorHandle(RewardLoopWorker(config), self.loop)]
            return worker_cls(config, llm_client, None, self.reward_handles)

        self.worker = asyncio.run_coroutine_threadsafe(build(), self.loop).result()

    def generate_sequences(self, prompts) -> None:
        asyncio.run_coroutine_threadsafe(self.worker.generate_sequences(prompts), self.loop).result()

    def close(self) -> None:
        async def drain():
            tasks = list(getattr(self.worker, "background_tasks", ()))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class _NoWeightSync:
    """``CheckpointEngineManager`` stand-in: the rollout shares the actor's module, so an update only
    records the weights' version."""

    def __init__(self):
        self.client: HFGenerateClient | None = None
        self.version = 0

    def update_weights(self, global_steps: int = 0, *args, **kwargs) -> None:
        self.version = int(global_steps or 0)
        if self.client is not None:
            self.client.weights_version = self.version

    def sleep_replicas(self, *args, **kwargs) -> None:
        return None


@dataclass
class _OneDevice:
    def get_n_gpus(self) -> int:
        return 1


@dataclass
class _RewardLoop:
    reward_loop_worker_handles: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- run
def compose_config(
    methods: Sequence[Any] | None,
    work: Path,
    reward_file: Path,
    overrides: Sequence[str] = (),
    checkpoint_dir: Path | None = None,
):
    """verl's ``ppo_trainer`` config with :data:`TINY_OVERRIDES`, the tiny assets in ``work``
    (``model/``, ``train.parquet``, ``val.parquet``), checkpoints in ``checkpoint_dir`` (default
    ``work/ckpt``), ``overrides``, and the adapter's ``prepare_config`` for ``methods`` (None: plain
    verl GRPO, no adapter)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from grpo_plugins_verl.main import prepare_config

    paths = (
        f"data.train_files={work / 'train.parquet'}",
        f"data.val_files={work / 'val.parquet'}",
        f"actor_rollout_ref.model.path={work / 'model'}",
        f"reward.custom_reward_function.path={reward_file}",
        f"trainer.default_local_dir={checkpoint_dir or work / 'ckpt'}",
    )
    plugin = () if methods is None else (f"+grpo_plugins={_hydra_list(methods)}",)
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=[*TINY_OVERRIDES, *paths, *plugin, *overrides])
    if methods is None:
        config.algorithm.adv_estimator = "grpo"
    else:
        config = prepare_config(config)
    config.transfer_queue.enable = True
    OmegaConf.resolve(config)
    return config


def _hydra_list(methods: Sequence[Any]) -> str:
    """The method list in Hydra's override grammar (unquoted dict keys, quoted strings)."""

    def text(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{key}: {text(item)}" for key, item in value.items()) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(text(item) for item in value) + "]"
        if isinstance(value, str):
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        if value is None or isinstance(value, bool):
            return {None: "null", True: "true", False: "false"}[value]
        return repr(value)

    return text(list(methods))


@contextmanager
def _process_group():
    """A one-process gloo group: verl's ``TrainingWorker`` gathers token counts over the dp group."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class FitResult:
    """What one :func:`run_fit` leaves behind."""

    trainer: Any
    metrics: list[dict] = field(default_factory=list)
    rollout_counts: list[list[int]] = field(default_factory=list)
    model: torch.nn.Module | None = None


def run_fit(config: Any, seed: int = 0, before_fit: Callable[[Any], None] | None = None) -> FitResult:
    """Build the trainer verl's ``TaskRunnerV1`` would build for ``config`` and run verl's ``fit()``.

    Needs a running Ray (``ray.init``); starts and closes a TransferQueue. The run's methods start
    from fresh state (cached compositions of earlier runs in this process are dropped).
    ``before_fit(trainer)`` runs after the checkpoint is loaded. Returns the trainer, every step's
    logged metrics, and the number of completions each prompt group of each step got.
    """
    import transfer_queue as tq
    from transformers import AutoModelForCausalLM
    from verl.trainer.ppo.v1 import get_trainer_cls

    from grpo_plugins_verl.runtime import clear_cache

    clear_cache()
    torch.manual_seed(seed)
    tq.init(config.transfer_queue)
    manager = None
    try:
        with _process_group():
            trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config=config)
            result = FitResult(trainer)
            trainer._init_tokenizer()
            trainer._init_dataloader()
            trainer._init_dump_executor()
            model = AutoModelForCausalLM.from_pretrained(config.actor_rollout_ref.model.path, dtype=torch.float32)
            result.model = model
            trainer.resource_pool_manager = _OneDevice()
            trainer.actor_rollout_wg = build_worker_group(config, model)
            trainer.ref_in_actor = False
            if trainer.use_reference_policy:
                trainer.ref_policy_wg = trainer.actor_rollout_wg
            trainer.teacher_model_manager = None
            trainer.distillation_config = None
            trainer.checkpoint_manager = _NoWeightSync()
            trainer._load_checkpoint()
            trainer.on_init_end()
            client = HFGenerateClient(model, trainer.tokenizer, int(config.actor_rollout_ref.rollout.response_length))
            trainer.checkpoint_manager.client, client.weights_version = client, trainer.checkpoint_manager.version
            manager = InProcessAgentLoopManager(config, client)
            trainer.reward_loop_manager = _RewardLoop(manager.reward_handles)
            _record(trainer, result)
            if before_fit is not None:
                before_fit(trainer)
            trainer.fit(manager)
    finally:
        if manager is not None:
            manager.close()
        tq.close()
    return result


def _record(trainer: Any, result: FitResult) -> None:
    """Keep each step's metrics and per-group completion counts (wrapping the trainer's methods)."""
    from verl.trainer.ppo.v1 import trainer_base

    log_step = trainer._compute_metrics

    def compute_metrics(batch, metrics, timing_raw, global_steps, epoch):
        keys = [key for key, tag in zip(batch.keys, batch.tags) if not tag.get("is_padding", False)]
        groups: dict[str, int] = {}
        for key in keys:
            uid = str(key).rsplit("_", 2)[0]
            groups[uid] = groups.get(uid, 0) + 1
        result.rollout_counts.append(sorted(groups.values()))
        log_step(batch, metrics, timing_raw, global_steps, epoch)
        result.metrics.append(dict(metrics))

    trainer._compute_metrics = compute_metrics
    del trainer_base

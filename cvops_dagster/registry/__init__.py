"""Registry: which trained model serves, decided by the champion gate and kept in an append-only history.

- ``history``: one immutable object per publish event (promoted, republished, rollback), the
  champion replayed from them, ``production/current.json``;
- ``decisions``: the gate's recorded decisions, ``production/decisions/<id>.json``;
- ``gate``: scoring challenger and champion on today's test split and its slices, the promotion
  rule, the no-regression check, the rollback decision.

Publishing a decision (runtimes, history event, pointers) is serving's job
(:mod:`cvops_dagster.serving.publication`). The model store itself (safetensors + model card,
:mod:`cvops_dagster.training.model_store`) lives with training: training writes it and the model
family it rebuilds from is training's. ``history`` and ``decisions`` are plain JSON (serving reads
them without torch); ``gate`` scores models with torch.
"""

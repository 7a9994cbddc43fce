"""Registry: the champion gate over trained models (promotion, history, rollback).

The model store itself (safetensors + model card, :mod:`cvops_dagster.training.model_store`)
lives with training: training writes it and the model family it rebuilds from is training's.
"""

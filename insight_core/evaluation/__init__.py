"""Evaluation of trained models: SAE reconstruction metrics, caption scores."""

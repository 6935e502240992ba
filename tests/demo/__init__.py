"""Tests for llava.demo (shapes dataset, tiny models)."""

"""MoE expert residency: routing statistics, hot sets, locked pages, persisted statistics; the prefetch setting."""

from .residency import ExpertResidency, MoEConfig, lock_all, parse_hot_count, parse_prefetch

__all__ = ["ExpertResidency", "MoEConfig", "lock_all", "parse_hot_count", "parse_prefetch"]

"""Memory tiers (pinned host, CXL, NVMe) and the movers that carry out a Plan (issue: memory tiers)."""

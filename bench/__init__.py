"""Relais benchmarks: `./dev bench` (python -m bench).

One run, one Redis, two figures side by side:
- (B) the floor Redis itself sets: a raw redis-py XADD -> XREADGROUP -> XACK loop, one message in flight;
- (P) the whole pipeline as deployed: HTTP POST /api/v1/needs on intake -> referral routes it -> notifications
  sends the handoff email, accepted by an SMTP sink in the bench process; needs/s and latency per need.
See docs/benchmarks.md for what is measured and the figures of record. Nothing here asserts on time.
"""

"""The Ray Serve request router of the Press replicas: prefix affinity (server/ray_serve/routing.py), falling back
to Ray Serve's least-loaded choice. Referenced by import path from the deployment's RequestRouterConfig."""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, RequestRouter

from server.ray_serve.routing import AffinityTable


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance: int = 4, capacity: int = 100_000, **kwargs) -> None:
        self.imbalance = imbalance
        self.table = AffinityTable(capacity)
        self.in_flight: dict[str, int] = {}  # requests this router sent each replica that have not completed

    @staticmethod
    def _keys(pending_request) -> list[str]:
        if pending_request is None or not pending_request.args:
            return []
        return list(getattr(pending_request.args[0], "affinity", None) or [])

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all replicas full: back off between tries
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        keys = self._keys(pending_request)
        preferred = self.table.lookup(keys, set(by_id)) if keys else None
        if preferred is not None:
            lengths = {rid: self.in_flight.get(rid, 0) for rid in by_id}
            if lengths[preferred] - min(lengths.values()) <= self.imbalance:
                others = [r for rid, r in by_id.items() if rid != preferred]
                return [[by_id[preferred]], others] if others else [[by_id[preferred]]]
        # One rank: Ray Serve probes the queues and takes the shortest (shuffled, so idle replicas share ties).
        return [random.sample(candidate_replicas, len(candidate_replicas))]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        rid = replica_id.unique_id
        self.in_flight[rid] = self.in_flight.get(rid, 0) + 1
        keys = self._keys(pending_request)
        if keys:
            self.table.record(keys, rid)

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        rid = replica_id.unique_id
        self.in_flight[rid] = max(0, self.in_flight.get(rid, 0) - 1)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
        self.in_flight.pop(replica_id.unique_id, None)

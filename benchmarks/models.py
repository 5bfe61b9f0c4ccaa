"""The benchmark's table: a small model read by primary key, one row per message."""

from __future__ import annotations

from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=40)
    qty = models.IntegerField(default=1)
    objects: models.Manager[Item] = models.Manager()

    class Meta:
        app_label = "benchmarks"
        db_table = "freshconn_bench_item"

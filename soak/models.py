"""The soak's tables: one row per applied message (UNIQUE message id) and a few counters.

Each message's transaction inserts its row and adds one to one counter, so the counters' sum
equals the number of rows exactly when no transaction was applied more (or less) than once.
"""

from __future__ import annotations

from django.db import models

BUCKETS = 16


class Applied(models.Model):
    msg_id = models.CharField(max_length=32, unique=True)
    bucket = models.IntegerField()
    #: Which delivery of the message (1 = first) applied it: redeliveries show up here.
    delivery = models.IntegerField()
    objects: models.Manager[Applied] = models.Manager()

    class Meta:
        app_label = "soak"
        db_table = "soak_applied"


class Counter(models.Model):
    id = models.IntegerField(primary_key=True)
    n = models.BigIntegerField(default=0)
    objects: models.Manager[Counter] = models.Manager()

    class Meta:
        app_label = "soak"
        db_table = "soak_counter"

from django.db import models


class Order(models.Model):
    """One order, written once per Kafka message (``ref`` is unique, so a replay would be an error)."""

    ref = models.CharField(max_length=40, unique=True)
    batch = models.PositiveSmallIntegerField()
    qty = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.ref

from django.db import models


class Order(models.Model):
    ref = models.CharField(max_length=40, unique=True)
    qty = models.IntegerField(default=1)

    class Meta:
        app_label = "app"


class Alert(models.Model):
    """Something due to be notified (tests/workerapp's fc_tick_loop command sends each one once)."""

    name = models.CharField(max_length=40, unique=True)
    due = models.BooleanField(default=True)

    class Meta:
        app_label = "app"


class Notification(models.Model):
    """One sent alert; the one-to-one key makes an alert sent twice fail loudly."""

    alert = models.OneToOneField(Alert, on_delete=models.CASCADE)

    class Meta:
        app_label = "app"

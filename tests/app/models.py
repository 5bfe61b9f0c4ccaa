from django.db import models


class Order(models.Model):
    ref = models.CharField(max_length=40, unique=True)
    qty = models.IntegerField(default=1)

    class Meta:
        app_label = "app"

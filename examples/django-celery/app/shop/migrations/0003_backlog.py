from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_tick")]

    operations = [
        migrations.CreateModel(
            name="Backlog",
            fields=[
                ("task_id", models.UUIDField(primary_key=True, serialize=False)),
                ("batch", models.CharField(max_length=64)),
                ("sent_at", models.DateTimeField()),
            ],
        ),
    ]

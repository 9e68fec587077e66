from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="TaskRun",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("batch", models.CharField(db_index=True, max_length=64)),
                ("hostname", models.CharField(max_length=255)),
                ("started", models.DateTimeField()),
                ("finished", models.DateTimeField()),
            ],
        ),
    ]

from django.db import migrations, models

#: The queue each task has from now on; before, every task went to "default".
QUEUE_OF_TASK = {
    "datacenter.tasks.run_job_task": "datacenter",
    "imports.tasks.run_import_task": "imports",
}


def move_waiting_tasks(apps, schema_editor):
    """Waiting tasks go to the queue whose worker now serves them."""
    DBTaskResult = apps.get_model("django_tasks_database", "DBTaskResult")
    for path, queue in QUEUE_OF_TASK.items():
        DBTaskResult.objects.filter(queue_name="default", task_path=path).update(queue_name=queue)


class Migration(migrations.Migration):
    dependencies = [
        ("datacenter", "0006_roles"),
        ("django_tasks_database", "0021_conditional_partial_index_ordering"),
    ]

    operations = [
        migrations.AddField(
            model_name="workerheartbeat",
            name="queues",
            field=models.CharField(default="*", max_length=255),
        ),
        migrations.RunPython(move_waiting_tasks, migrations.RunPython.noop),
    ]

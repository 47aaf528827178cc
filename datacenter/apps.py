from django.apps import AppConfig


class DatacenterConfig(AppConfig):
    name = "datacenter"
    verbose_name = "Data center"

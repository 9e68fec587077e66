from django.urls import re_path

from shop import views

# With and without the trailing slash: probes and clients of other
# frameworks ask for /readyz (there is no CommonMiddleware to redirect).
urlpatterns = [
    re_path(r"^healthz/?$", views.healthz),
    re_path(r"^readyz/?$", views.readyz),
    re_path(r"^slow-query/?$", views.slow_query),
    re_path(r"^tasks/slow/?$", views.enqueue_slow),
    re_path(r"^tasks/runs/?$", views.task_runs),
    re_path(r"^ticks/?$", views.ticks),
]

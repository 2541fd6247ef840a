"""Launchers (registry ``launcher``): where teacher, student and rollout workers run."""

from kdlib.config.training import LauncherConfig
from kdlib.launch.ray import RayLauncherConfig
from kdlib.launch.base import LAUNCHERS, Launcher, WorkerGroup, build_launcher

LAUNCHERS.register("local", "kdlib.launch.local:LocalLauncher", config=LauncherConfig)
LAUNCHERS.register("ray", "kdlib.launch.ray:RayLauncher", config=RayLauncherConfig)

__all__ = ["LAUNCHERS", "Launcher", "WorkerGroup", "build_launcher"]

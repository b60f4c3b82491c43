"""OneActor in the WebUIs (``generation.py``: its per-job run on ``p``; ``network.py``, ``eta2.py``, ``create.py``,
``tab.py``, ``api.py``)."""

RUN_ATTRIBUTE = "consistent_story_oneactor"  # the job's ``OneActorRun`` on ``p`` (read by ``hosts/lockstep.py`` too)

"""normsweep's Hydra configs. pyproject.toml installs this directory as the package ``normsweep.conf``,
which is how the entrypoint finds it (``pkg://normsweep.conf``), in a clone and installed alike."""

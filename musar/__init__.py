"""The MUSAR platform's shared glue: the one configuration system and the ``musar`` CLI."""

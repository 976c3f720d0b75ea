"""The runtime every stage runs in: the device (``device``), the ``torchrun`` process group and how data is split
over it (``distributed``, ``sharding``), seeds and random states (``seeding``), and logging with the one progress
display (``progress``). Nothing here knows about models, data sets, training or attacks."""

"""The broker: aiohttp app, topic state machine, reaper, discovery, RESP."""

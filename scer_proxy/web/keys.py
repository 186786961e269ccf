"""Typed application keys shared by the app wiring and the endpoints."""

from __future__ import annotations

from aiohttp import web

from scer_proxy.config import Config
from scer_proxy.grid.providers import GridIntensitySource
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.meters.sampler import UpstreamMeter
from scer_proxy.proxy.accounting import Accounting
from scer_proxy.proxy.upstreams import Upstreams
from scer_proxy.scer.book import RatingsBook
from scer_proxy.summary.metrics import Counters

CONFIG = web.AppKey("config", Config)
LEDGER = web.AppKey("ledger", SqliteLedger)
ACCOUNTING = web.AppKey("accounting", Accounting)
METERS = web.AppKey("meters", dict[str, UpstreamMeter])
METER_NOTES = web.AppKey("meter_notes", dict[str, str])
UPSTREAMS = web.AppKey("upstreams", Upstreams)
GRID = web.AppKey("grid", GridIntensitySource)
RATINGS = web.AppKey("ratings", RatingsBook)
COUNTERS = web.AppKey("counters", Counters)  # what /metrics counts, fed by every record put in the ledger
STARTED_AT = web.AppKey("started_at", float)  # Unix seconds the app (and its counters) started

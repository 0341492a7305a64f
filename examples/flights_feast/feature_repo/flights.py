"""Feature views keyed by carrier and by origin airport: yesterday's departures and delay rate."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

carrier = Entity(name="carrier", join_keys=["carrier"], value_type=ValueType.STRING)
origin = Entity(name="origin", join_keys=["origin"], value_type=ValueType.STRING)

# ttl: a day's aggregate serves the next day; two days of slack cover a carrier's day off
carrier_daily = FeatureView(
    name="carrier_daily", entities=[carrier], ttl=timedelta(days=3),
    schema=[Field(name="carrier_flights_1d", dtype=Int64),
            Field(name="carrier_delay_rate_1d", dtype=Float64)],
    source=FileSource(path="data/carrier_daily.parquet", timestamp_field="event_timestamp"))

origin_daily = FeatureView(
    name="origin_daily", entities=[origin], ttl=timedelta(days=3),
    schema=[Field(name="origin_flights_1d", dtype=Int64),
            Field(name="origin_delay_rate_1d", dtype=Float64)],
    source=FileSource(path="data/origin_daily.parquet", timestamp_field="event_timestamp"))

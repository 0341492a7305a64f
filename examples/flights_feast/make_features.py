"""Derive the feature views' source tables from ../flights/data/flights.parquet.

Per carrier and per origin airport, each day's number of departures and share of flights that
arrived more than 15 minutes late. A day's figures are known once the day is over, so each row's
event timestamp is midnight after that day: a flight on day D is joined with D-1's aggregates
(and with nothing later), which is what the point-in-time join guarantees.

    python make_features.py    # rewrites feature_repo/data/{carrier,origin}_daily.parquet
"""

from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent


def main() -> None:
    flights = pd.read_parquet(HERE.parent / "flights" / "data" / "flights.parquet",
                              columns=["datetime", "carrier", "origin", "delayed"])
    flights["date"] = flights["datetime"].dt.floor("D")
    for key in ("carrier", "origin"):
        daily = (flights.groupby([key, "date"])
                 .agg(flights=("delayed", "size"), delay_rate=("delayed", "mean"))
                 .reset_index()
                 .rename(columns={"flights": f"{key}_flights_1d",
                                  "delay_rate": f"{key}_delay_rate_1d"}))
        daily["event_timestamp"] = (daily.pop("date") + pd.Timedelta(days=1)).dt.tz_localize(
            "UTC").astype("datetime64[us, UTC]")
        daily.to_parquet(HERE / "feature_repo" / "data" / f"{key}_daily.parquet", index=False)
        print(f"{key}_daily: {len(daily)} rows")


if __name__ == "__main__":
    main()

"""Prints where build_facts.py's tables differ from independent sources; not run by the tests.

Needs babel (CLDR territory currencies and languages), periodictable and pycountry, e.g.
`pip install --target /tmp/factchk babel periodictable pycountry` and
`PYTHONPATH=/tmp/factchk python data/facts/crosscheck.py`. The differences it printed when the
sets were made, and what was decided about each, are in README.md.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import periodictable
import pycountry
from babel import Locale, languages, numbers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_facts as B  # noqa: E402

ISO2 = {"Bolivia": "BO", "Brunei": "BN", "Cape Verde": "CV", "Republic of the Congo": "CG",
        "Democratic Republic of the Congo": "CD", "Ivory Coast": "CI", "Czech Republic": "CZ", "Iran": "IR",
        "Laos": "LA", "Micronesia": "FM", "Moldova": "MD", "North Korea": "KP", "South Korea": "KR", "Russia": "RU",
        "Syria": "SY", "Tanzania": "TZ", "East Timor": "TL", "Turkey": "TR", "United Kingdom": "GB",
        "United States": "US", "Venezuela": "VE", "Vietnam": "VN", "Vatican City": "VA", "Kosovo": "XK",
        "Taiwan": "TW", "Hong Kong": "HK", "Macau": "MO", "Palestine": "PS", "São Tomé and Príncipe": "ST",
        "Eswatini": "SZ"}


def iso2(country: str) -> str:
    return ISO2.get(country) or pycountry.countries.lookup(country).alpha_2


def main(day: datetime.date = datetime.date(2026, 11, 30)) -> None:
    for z, symbol, name, _ in B.ELEMENTS:
        e = periodictable.elements[z]
        if (e.symbol, e.name) != (symbol, name):
            print(f"element {z}: {symbol} {name} vs periodictable {e.symbol} {e.name}")
    for code in B.CURRENCIES:
        if code != "bitcoin" and pycountry.currencies.get(alpha_3=code) is None:
            print(f"currency {code}: not in pycountry's ISO 4217")
    for country, codes in B.COUNTRY_CURRENCY.items():
        cldr = numbers.get_territory_currencies(iso2(country), day, tender=True)
        if set(codes) - {"bitcoin"} != set(cldr):
            print(f"currency {country}: {codes} vs CLDR legal tender {cldr}")
    english = Locale("en")
    for country, langs in B.COUNTRY_LANGUAGE.items():
        mine = {a.casefold() for lang in langs for a in B.LANGUAGES[lang]}
        cldr = [english.languages.get(x.split("_")[0], x)
                for x in languages.get_official_languages(iso2(country), regional=False, de_facto=True)]
        if missing := [n for n in cldr if n.casefold() not in mine]:
            print(f"language {country}: {langs}; CLDR also lists {missing}")


if __name__ == "__main__":
    main()

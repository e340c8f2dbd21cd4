"""The demo's bundled task: answer "What is the capital of X?" with the capital's name alone.

The embedded SmolLM2-135M-Instruct answers in a chatty sentence ("The capital of France is Paris.")
and often wrongly; after a short LoRA run it answers with just the city. Exact match on countries it
never saw in training shows what changed, and it is a metric anyone can check by hand.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# country:capital, one per entry; well-known pairs so the base model's knowledge can carry.
_PAIRS = """
France:Paris|Germany:Berlin|Italy:Rome|Spain:Madrid|Portugal:Lisbon|Japan:Tokyo|China:Beijing|India:New Delhi|
Russia:Moscow|Canada:Ottawa|Australia:Canberra|Brazil:Brasilia|Argentina:Buenos Aires|Mexico:Mexico City|
Egypt:Cairo|Kenya:Nairobi|Nigeria:Abuja|South Africa:Pretoria|Morocco:Rabat|Algeria:Algiers|Tunisia:Tunis|
Ethiopia:Addis Ababa|Ghana:Accra|Senegal:Dakar|Uganda:Kampala|Tanzania:Dodoma|Zimbabwe:Harare|Zambia:Lusaka|
Angola:Luanda|Sudan:Khartoum|Libya:Tripoli|Mali:Bamako|Niger:Niamey|Chad:N'Djamena|Somalia:Mogadishu|
Rwanda:Kigali|Norway:Oslo|Sweden:Stockholm|Finland:Helsinki|Denmark:Copenhagen|Iceland:Reykjavik|
Ireland:Dublin|United Kingdom:London|Netherlands:Amsterdam|Belgium:Brussels|Austria:Vienna|Switzerland:Bern|
Poland:Warsaw|Czech Republic:Prague|Slovakia:Bratislava|Hungary:Budapest|Romania:Bucharest|Bulgaria:Sofia|
Greece:Athens|Turkey:Ankara|Ukraine:Kyiv|Belarus:Minsk|Lithuania:Vilnius|Latvia:Riga|Estonia:Tallinn|
Serbia:Belgrade|Croatia:Zagreb|Slovenia:Ljubljana|Albania:Tirana|Georgia:Tbilisi|Armenia:Yerevan|
Azerbaijan:Baku|Kazakhstan:Astana|Uzbekistan:Tashkent|Iran:Tehran|Iraq:Baghdad|Syria:Damascus|
Jordan:Amman|Lebanon:Beirut|Israel:Jerusalem|Saudi Arabia:Riyadh|Qatar:Doha|Kuwait:Kuwait City|Oman:Muscat|
Yemen:Sanaa|Afghanistan:Kabul|Pakistan:Islamabad|Bangladesh:Dhaka|Nepal:Kathmandu|Sri Lanka:Colombo|
Thailand:Bangkok|Vietnam:Hanoi|Cambodia:Phnom Penh|Laos:Vientiane|Myanmar:Naypyidaw|Malaysia:Kuala Lumpur|
Singapore:Singapore|Indonesia:Jakarta|Philippines:Manila|South Korea:Seoul|North Korea:Pyongyang|
Mongolia:Ulaanbaatar|Taiwan:Taipei|New Zealand:Wellington|Fiji:Suva|Papua New Guinea:Port Moresby|
United States:Washington|Cuba:Havana|Jamaica:Kingston|Haiti:Port-au-Prince|Dominican Republic:Santo Domingo|
Guatemala:Guatemala City|Honduras:Tegucigalpa|Nicaragua:Managua|Costa Rica:San Jose|Panama:Panama City|
Colombia:Bogota|Venezuela:Caracas|Ecuador:Quito|Peru:Lima|Bolivia:Sucre|Chile:Santiago|Paraguay:Asuncion|
Uruguay:Montevideo|Luxembourg:Luxembourg|Monaco:Monaco|Malta:Valletta|Cyprus:Nicosia|Moldova:Chisinau|
North Macedonia:Skopje|Montenegro:Podgorica|Bosnia and Herzegovina:Sarajevo|Kyrgyzstan:Bishkek|
Tajikistan:Dushanbe|Turkmenistan:Ashgabat|Bhutan:Thimphu|Maldives:Male|Madagascar:Antananarivo|
Mozambique:Maputo|Namibia:Windhoek|Botswana:Gaborone|Cameroon:Yaounde|Ivory Coast:Yamoussoukro
"""

QUESTION = "What is the capital of {country}?"


def capital_pairs() -> list[tuple[str, str]]:
    items = [p.strip() for p in _PAIRS.replace("\n", "").split("|") if p.strip()]
    return [tuple(p.split(":", 1)) for p in items]  # type: ignore[misc]


def write_demo_data(out_dir: Path, seed: int = 0, n_val: int = 24) -> dict[str, Path]:
    """Write train.jsonl (qa format) and capitals_val.jsonl; returns their paths."""
    pairs = capital_pairs()
    random.Random(seed).shuffle(pairs)
    val, train = pairs[:n_val], pairs[n_val:]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "capitals_val": out_dir / "capitals_val.jsonl"}
    for name, rows in (("train", train), ("capitals_val", val)):
        with open(paths[name], "w", encoding="utf-8") as f:
            for country, capital in rows:
                f.write(json.dumps({"question": QUESTION.format(country=country), "answer": capital}) + "\n")
    return paths

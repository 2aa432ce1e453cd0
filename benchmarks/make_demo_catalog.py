"""Write the bundled demo catalogue, engine/data/demo_catalog.jsonl (deterministic).

    python benchmarks/make_demo_catalog.py          # rewrites the file
    python benchmarks/make_demo_catalog.py --check  # exit 1 if the file differs

About 300 phone-and-gadget products over 12 categories with names, brands,
descriptions, prices, ratings and stock flags; a fixed seed makes the file
reproducible. `make_rows(n_per_category)` is reused by the benchmark.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "engine" / "data" / "demo_catalog.jsonl"

PHONES = ["Pixel 9", "Pixel 8a", "iPhone 16", "iPhone 15 Pro", "Galaxy S24", "Galaxy A55", "Nothing Phone 2a",
          "OnePlus 12", "Xperia 10 VI", "Moto G84", "Redmi Note 13", "Fairphone 5"]
PHONE_BRAND = {"Pixel": "Google", "iPhone": "Apple", "Galaxy": "Samsung", "Nothing": "Nothing", "OnePlus": "OnePlus",
               "Xperia": "Sony", "Moto": "Motorola", "Redmi": "Xiaomi", "Fairphone": "Fairphone"}
ACCESSORY_BRANDS = ["Anker", "Belkin", "Spigen", "Ugreen", "OtterBox", "ESR", "Baseus", "Mophie", "Nimaso",
                    "Satechi", "JSAUX", "Torras"]
AUDIO_BRANDS = ["Sony", "Bose", "Sennheiser", "JBL", "Jabra", "Anker Soundcore", "Beyerdynamic", "Audio-Technica"]
WATCH_BRANDS = ["Garmin", "Samsung", "Apple", "Google", "Amazfit", "Withings", "Fossil"]
COLOURS = ["black", "white", "midnight blue", "sage green", "coral", "graphite", "clear", "sand"]


def _phone_brand(model: str) -> str:
    return next(b for k, b in PHONE_BRAND.items() if model.startswith(k))


def _case(r: random.Random, i: int) -> dict:
    phone = r.choice(PHONES)
    kind = r.choice(["slim silicone case", "rugged shockproof case", "clear MagSafe case", "leather wallet case",
                     "folio flip case"])
    colour = r.choice(COLOURS)
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {kind} for {phone} ({colour})", "category": "phone case",
            "compatible_with": phone, "price": round(r.uniform(9, 49), 2),
            "description": f"A {kind} for the {phone} in {colour}: raised edges protect the camera and screen, "
                           "precise cut-outs, wireless charging passes through."}


def _charger(r: random.Random, i: int) -> dict:
    watts = r.choice([20, 25, 30, 45, 65, 100, 140])
    ports = r.choice(["1 USB-C port", "2 USB-C ports", "USB-C and USB-A ports", "3 ports"])
    gan = "GaN " if watts >= 45 else ""
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {watts}W {gan}USB-C wall charger, {ports}", "category": "charger",
            "watts": watts, "price": round(8 + watts * r.uniform(0.25, 0.5), 2),
            "description": f"Compact {watts} W {gan}power delivery wall charger with {ports}; fast-charges phones, "
                           "tablets and laptops, foldable plug, overheat protection."}


def _cable(r: random.Random, i: int) -> dict:
    kind = r.choice(["USB-C to USB-C", "USB-C to Lightning", "USB-A to USB-C", "USB-C to USB-C 240W",
                     "magnetic USB-C"])
    length = r.choice([0.5, 1, 1.5, 2, 3])
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {kind} cable, {length} m braided", "category": "cable",
            "length_m": length, "price": round(r.uniform(6, 29), 2),
            "description": f"Braided nylon {kind} charging and data cable, {length} m long, "
                           "tested for 20,000 bends; supports fast charging."}


def _headphones(r: random.Random, i: int) -> dict:
    kind = r.choice(["noise-cancelling over-ear headphones", "wireless on-ear headphones",
                     "studio headphones", "open-back headphones"])
    hours = r.choice([20, 30, 40, 50, 60])
    return {"name": f"{r.choice(AUDIO_BRANDS)} {kind} {r.choice(['Pro', 'Air', 'Max', 'II', 'Studio', 'Go'])}",
            "category": "headphones", "battery_hours": hours, "price": round(r.uniform(39, 399), 2),
            "description": f"Bluetooth {kind} with {hours} hours of battery life, a USB-C port, "
                           "multipoint pairing with a phone and a laptop, and a carry case."}


def _earbuds(r: random.Random, i: int) -> dict:
    anc = r.random() < 0.6
    return {"name": f"{r.choice(AUDIO_BRANDS)} true wireless earbuds {r.choice(['Buds', 'Free', 'Pods', 'Sport'])}"
                    f" {r.randint(2, 6)}", "category": "earbuds", "price": round(r.uniform(25, 279), 2),
            "description": "Wireless in-ear earbuds with a charging case"
                           + (", active noise cancellation" if anc else "")
                           + ", sweat resistant (IPX4), touch controls, works with Android and iPhone."}


def _protector(r: random.Random, i: int) -> dict:
    phone = r.choice(PHONES)
    kind = r.choice(["tempered glass screen protector (2-pack)", "privacy screen protector",
                     "matte anti-glare screen protector", "camera lens protector"])
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {kind} for {phone}", "category": "screen protector",
            "compatible_with": phone, "price": round(r.uniform(6, 25), 2),
            "description": f"9H hardness {kind} for the {phone}, bubble-free installation frame, "
                           "case friendly, keeps touch sensitivity."}


def _powerbank(r: random.Random, i: int) -> dict:
    mah = r.choice([5000, 10000, 20000, 25000, 27650])
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {mah} mAh power bank{r.choice(['', ' with MagSafe', ' 65W'])}",
            "category": "power bank", "capacity_mah": mah, "price": round(15 + mah / 400 * r.uniform(0.6, 1.3), 2),
            "description": f"Portable {mah} mAh battery pack with USB-C power delivery; charges a phone "
                           f"about {max(1, mah // 4000)} times, airline safe, LED charge indicator."}


def _watch(r: random.Random, i: int) -> dict:
    brand = r.choice(WATCH_BRANDS)
    return {"name": f"{brand} smartwatch {r.choice(['Fit', 'Active', 'Series', 'Venu', 'GTR', 'Pro'])} "
                    f"{r.randint(2, 9)} ({r.choice(['41', '44', '46'])} mm)", "category": "smartwatch",
            "brand": brand, "price": round(r.uniform(79, 499), 2),
            "description": "Fitness smartwatch with heart-rate and sleep tracking, GPS, notifications from your "
                           f"phone, {r.choice([2, 5, 7, 14])}-day battery and water resistance to 50 m."}


def _mount(r: random.Random, i: int) -> dict:
    kind = r.choice(["magnetic car vent mount", "dashboard phone holder", "wireless charging car mount",
                     "bike handlebar phone mount"])
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {kind}", "category": "car mount",
            "price": round(r.uniform(12, 59), 2),
            "description": f"A {kind} that holds phones from 4.7 to 6.9 inches securely; one-hand release "
                           "and 360 degree rotation."}


def _wireless(r: random.Random, i: int) -> dict:
    kind = r.choice(["Qi2 wireless charging pad", "3-in-1 wireless charging stand", "MagSafe charger puck",
                     "foldable wireless charger for phone, watch and earbuds"])
    return {"name": f"{r.choice(ACCESSORY_BRANDS)} {kind}", "category": "wireless charger",
            "price": round(r.uniform(19, 129), 2),
            "description": f"{kind.capitalize()} delivering up to 15 W to a phone; charges through thin cases, "
                           "with foreign-object detection."}


def _phone(r: random.Random, i: int) -> dict:
    model = PHONES[i % len(PHONES)]
    storage = r.choice([128, 256, 512])
    return {"name": f"{model} {storage} GB ({r.choice(COLOURS)})", "category": "phone", "brand": _phone_brand(model),
            "storage_gb": storage, "price": round(r.uniform(299, 1299), 2),
            "description": f"The {model} smartphone with {storage} GB of storage, an OLED display, a dual camera "
                           "and all-day battery; USB-C charging, 5G."}


def _speaker(r: random.Random, i: int) -> dict:
    return {"name": f"{r.choice(AUDIO_BRANDS)} portable Bluetooth speaker {r.choice(['Flip', 'Go', 'Boom', 'Mini'])}"
                    f" {r.randint(2, 6)}", "category": "speaker", "price": round(r.uniform(29, 249), 2),
            "description": "Waterproof portable Bluetooth speaker with deep bass, 12 hours of playback, "
                           "USB-C charging and a strap for outdoors."}


MAKERS = {"phone": _phone, "phone case": _case, "charger": _charger, "cable": _cable, "headphones": _headphones,
          "earbuds": _earbuds, "screen protector": _protector, "power bank": _powerbank, "smartwatch": _watch,
          "car mount": _mount, "wireless charger": _wireless, "speaker": _speaker}


def make_rows(n_per_category: int = 25, seed: int = 20240611) -> list[dict]:
    r = random.Random(seed)
    rows: list[dict] = []
    prefix = {"phone": "PHN", "phone case": "CASE", "charger": "CHG", "cable": "CBL", "headphones": "HP",
              "earbuds": "BUDS", "screen protector": "SCR", "power bank": "PWR", "smartwatch": "WATCH",
              "car mount": "MNT", "wireless charger": "WCHG", "speaker": "SPK"}
    for cat, fn in MAKERS.items():
        for i in range(n_per_category):
            row = fn(r, i)
            row.setdefault("brand", row["name"].split(" ")[0])
            item = {"id": f"{prefix[cat]}-{i + 1:03d}", "name": row.pop("name"), "category": cat,
                    "brand": row.pop("brand"), "price": row.pop("price"),
                    "rating": round(r.uniform(3.4, 4.9), 1), "in_stock": r.random() < 0.85}
            item.update({k: v for k, v in row.items() if k != "category"})
            rows.append(item)
    return rows


def main() -> int:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in make_rows())
    if "--check" in sys.argv:
        return 0 if OUT.read_text(encoding="utf-8") == text else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({text.count(chr(10))} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

/**
 * The user-creatable objects a daemon holds by id (QEMU's /objects container: object-add, object-del,
 * --object): throttle groups, which `throttle` nodes name, and secrets, which drivers look up by id
 * (rbd's key-secret). One namespace for all types, as in QEMU: an id is taken by any object.
 */
import { genericError } from '../errors.js';
import { Secret } from '../base/secret.js';
import { ThrottleGroup } from './throttle-group.js';

export type UserObject = ThrottleGroup | Secret;

/** The QOM type name of an object. */
export function objectType(o: UserObject): 'throttle-group' | 'secret' {
  return o instanceof ThrottleGroup ? 'throttle-group' : 'secret';
}

export class UserObjects {
  private readonly objects = new Map<string, UserObject>();
  /**
   * QEMU creates the /objects container with the first object added (and keeps it): until then
   * qom-list and qom-get do not find it.
   */
  containerCreated = false;

  get(id: string): UserObject | undefined {
    return this.objects.get(id);
  }
  has(id: string): boolean {
    return this.objects.has(id);
  }
  add(o: UserObject): void {
    this.objects.set(o.id, o);
  }
  delete(id: string): void {
    this.objects.delete(id);
  }
  /** Every object, in the order they were added. */
  all(): UserObject[] {
    return [...this.objects.values()];
  }

  throttleGroup(id: string): ThrottleGroup | undefined {
    const o = this.objects.get(id);
    return o instanceof ThrottleGroup ? o : undefined;
  }

  /** qcrypto_secret_lookup: the value of the secret `id`, with QEMU 7.2's messages. */
  secretValue(id: string): Buffer {
    const o = this.objects.get(id);
    if (!o) throw genericError(`No secret with id '${id}'`);
    if (!(o instanceof Secret)) throw genericError(`Object with id '${id}' is not a secret`);
    return o.value;
  }
}
